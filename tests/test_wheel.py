"""The wheel works on its own: built by ``make dist``, installed into a fresh virtualenv.

``make dist`` builds the sdist and the wheel (``python -m build``) and checks their metadata
(``twine check --strict``); the test runs that very target, into a temporary directory. The
wheel then goes into a new virtualenv that sees nothing of this checkout: torch comes from
where the Makefile installs it (the release installed here, with ``$PIP_TORCH_ARGS``), the
rest from the wheel's own requirements. From there, torch's registry resolves ``etcd-v3``
(the ``torchrun.handlers`` entry point) for both handlers, ``torchrun --rdzv-backend=etcd-v3``
runs a one-node job against a live etcd, and ``etcd-rdzv --version`` prints the version the
wheel's metadata carries: ``etcd_rdzv.__version__``, its one source.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch

import etcd_rdzv
from etcd_rdzv.testing import EtcdServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent

#: Run inside the fresh virtualenv: torch's registry builds the etcd-v3 handler of each
#: handler kind, which joins a one-node round; one JSON line per handler.
_PROBE = """
import json, sys
from torch.distributed.elastic.rendezvous import RendezvousParameters
from torch.distributed.elastic.rendezvous import rendezvous_handler_registry as registry
import etcd_rdzv

endpoint, run_id = sys.argv[1], sys.argv[2]
for handler_kind in ("torch", "native"):
    params = RendezvousParameters(backend="etcd-v3", endpoint=endpoint,
                                  run_id=f"{run_id}-{handler_kind}", min_nodes=1, max_nodes=1,
                                  local_addr="127.0.0.1", handler=handler_kind,
                                  join_timeout="60")
    handler = registry.create_handler(params)
    info = handler.next_rendezvous()
    print(json.dumps({
        "handler": handler_kind, "backend": handler.get_backend(),
        "class": type(handler).__module__ + "." + type(handler).__name__,
        "rank": info.rank, "world_size": info.world_size,
        "bootstrap_store": info.bootstrap_store_info is not None,
        "package": etcd_rdzv.__file__,
    }), flush=True)
    handler.shutdown()
"""

#: The training script of the one-node torchrun job: what torchrun gave the worker.
_WORKER = """
import os
print("WORKER", os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["TORCHELASTIC_RUN_ID"],
      flush=True)
"""


def _clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without what would leak the checkout or the outer make into a child."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("PYTHONPATH", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "VIRTUAL_ENV")}
    env.update(extra or {})
    return env


def _run(command: list[str], *, cwd: Path, timeout: float = 600.0,
         env: Mapping[str, str] | None = None) -> str:
    """Run ``command``; its output, or a failure that shows it."""
    result = subprocess.run(command, cwd=cwd, env=_clean_env(env), capture_output=True,
                            text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{shlex.join(command)} exited {result.returncode}:\n" \
        + output[-4000:]
    return output


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``make dist`` into a temporary directory, with this interpreter's tools (``-o install``:
    the environment running the tests is the one set up already); its output."""
    out = tmp_path_factory.mktemp("dist")
    output = _run(["make", "--no-print-directory", "-o", "install", "dist", f"DIST_DIR={out}",
                   f"BIN={Path(sys.executable).parent}"], cwd=ROOT)
    return out, output


@pytest.fixture(scope="module")
def venv(dist: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv (no system site-packages) with torch and the wheel ``[torch]``;
    removed afterwards (about 1 GB)."""
    wheel = next(dist[0].glob("*.whl"))
    where = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", str(where)], cwd=where.parent)
    pip = [str(where / "bin" / "python"), "-m", "pip", "install", "-q"]
    # The release installed here, from where the Makefile took it; never a bare `torch`,
    # which resolves to the multi-GB CUDA build.
    _run([*pip, *shlex.split(os.environ.get("PIP_TORCH_ARGS", "")),
          f"torch=={torch.__version__}"], cwd=where.parent)
    _run([*pip, f"{wheel}[torch]"], cwd=where.parent)
    yield where
    shutil.rmtree(where, ignore_errors=True)


def test_make_dist_builds_an_sdist_and_a_wheel_with_valid_metadata(
        dist: tuple[Path, str]) -> None:
    out, output = dist
    version = etcd_rdzv.__version__
    assert sorted(path.name for path in out.iterdir()) == [
        f"etcd_rdzv-{version}-py3-none-any.whl", f"etcd_rdzv-{version}.tar.gz"]
    # twine check --strict: the long description renders, the required fields are there.
    assert output.count("PASSED") == 2, output


def test_the_wheel_installs_with_consistent_requirements(venv: Path) -> None:
    output = _run([str(venv / "bin" / "python"), "-m", "pip", "check"], cwd=venv)
    assert "No broken requirements" in output
    metadata = _run([str(venv / "bin" / "python"), "-c",
                     "from importlib.metadata import version; print(version('etcd-rdzv'))"],
                    cwd=venv)
    assert metadata.strip() == etcd_rdzv.__version__


def test_etcd_rdzv_version_prints_the_one_version(venv: Path) -> None:
    output = _run([str(venv / "bin" / "etcd-rdzv"), "--version"], cwd=venv)
    assert output.strip() == f"etcd-rdzv {etcd_rdzv.__version__}"


def test_torchs_registry_resolves_etcd_v3_from_the_wheel(venv: Path,
                                                         etcd_server: EtcdServer) -> None:
    output = _run([str(venv / "bin" / "python"), "-c", _PROBE, etcd_server.get_endpoint(),
                   f"wheel-{uuid.uuid4().hex[:8]}"], cwd=venv, timeout=180)
    answers = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert [answer["handler"] for answer in answers] == ["torch", "native"], output
    site_packages = str(venv / "lib")
    for answer in answers:
        assert answer["backend"] == "etcd-v3"
        assert answer["class"].startswith("etcd_rdzv.elastic."), answer
        assert (answer["rank"], answer["world_size"], answer["bootstrap_store"]) == \
            (0, 1, True), answer
        # The installed wheel answered, not this checkout.
        assert answer["package"].startswith(site_packages), answer


def test_torchrun_from_the_virtualenv_runs_an_etcd_v3_job(venv: Path,
                                                          etcd_server: EtcdServer) -> None:
    script = venv.parent / "worker.py"
    script.write_text(_WORKER)
    run_id = f"wheel-{uuid.uuid4().hex[:8]}"
    output = _run([str(venv / "bin" / "torchrun"), "--nnodes=1", "--nproc-per-node=1",
                   "--rdzv-backend=etcd-v3", f"--rdzv-endpoint={etcd_server.get_endpoint()}",
                   f"--rdzv-id={run_id}", "--local-addr=127.0.0.1", str(script)],
                  cwd=venv.parent, timeout=180)
    assert f"WORKER 0 1 {run_id}" in output, output[-3000:]

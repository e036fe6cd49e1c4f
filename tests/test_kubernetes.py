"""Kubernetes: the manifests of docs/kubernetes/ say only what the code reads, and work.

Every manifest (``docs/kubernetes/*.yaml``, and the YAML blocks of docs/kubernetes.md) is
loaded with PyYAML and checked against what reads it:

* each ``rdzvConf`` key is an option etcd-v3 or torch's handler reads
  (``etcd_rdzv.config.BACKEND_OPTIONS``, torch's handler options), no password is among
  them, every file they name is mounted from a Secret, and the values parse;
* each environment name is one the code reads: torchrun's ``PET_*`` (checked by parsing
  torchrun's own arguments with it set), ``etcd_rdzv.config.PASSWORD_ENV_VAR``, a variable
  torch reads (named in torch.distributed's sources), etcdctl's ``ETCDCTL_<flag>``, or one
  the container's command or script uses;
* each etcd flag is one etcd knows (``etcd --help`` of the binary the tests run).

The end-to-end test plays the training-operator and the kubelet: it turns the PyTorchJob's
``elasticPolicy`` into the ``PET_*`` variables the operator injects (its rules are in
:func:`operator_env`), mounts the Secrets as files, runs the manifest's auth script against a
3-member etcd with TLS and client certificates, and starts two torchrun nodes configured
only by that environment, no torchrun flag. Two things are the test's own: the endpoints and
file paths of this machine, and ``last_call_timeout=1`` (with 2 of at most 4 nodes, torch's
handler would otherwise wait its 30 s last call).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch.distributed
import yaml
from torch.distributed.run import get_args_parser

from etcd_rdzv import Deadline, EtcdAuthError, EtcdClient, EtcdConfig
from etcd_rdzv.config import (
    BACKEND_OPTIONS,
    PASSWORD_ENV_VAR,
    RendezvousConfig,
    parse_endpoints,
)
from etcd_rdzv.testing import EtcdCluster, TlsCertificates, find_etcd_binary, make_certificates
from examples.torchrun_demo import (
    LOCAL_ADDR,
    TRAIN_SCRIPT,
    TorchrunNode,
    describe,
    torchrun_env,
    torchrun_executable,
)

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "docs" / "kubernetes"
PAGE = ROOT / "docs" / "kubernetes.md"

#: torch's DynamicRendezvousHandler options, which torch (or handler=native) reads.
HANDLER_OPTIONS = frozenset({"join_timeout", "last_call_timeout", "close_timeout",
                             "heartbeat_timeout", "keep_alive_interval",
                             "keep_alive_max_attempt"})
#: Options whose value is a file the agent reads.
FILE_OPTIONS = frozenset({"ca_cert", "ssl_cert", "ssl_cert_key", "password_file"})
_YAML_BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.DOTALL | re.MULTILINE)
_SUBSTITUTION = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")  # Kubernetes' $(NAME)
_SHELL_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


# Loading.

@dataclass(frozen=True)
class Manifest:
    """One YAML document: where it comes from, and what it says."""

    source: str
    body: dict[str, Any]


def manifests() -> list[Manifest]:
    """Every document of docs/kubernetes/*.yaml, then every YAML block of the page."""
    found = [Manifest(path.relative_to(ROOT).as_posix(), body)
             for path in sorted(MANIFESTS.glob("*.yaml"))
             for body in yaml.safe_load_all(path.read_text()) if body]
    for number, block in enumerate(_YAML_BLOCK.findall(PAGE.read_text()), 1):
        found += [Manifest(f"docs/kubernetes.md, YAML block {number}", body)
                  for body in yaml.safe_load_all(block) if body]
    return found


def the(kind: str) -> dict[str, Any]:
    """The one document of ``kind`` among docs/kubernetes/*.yaml."""
    found = [m.body for m in manifests()
             if m.body.get("kind") == kind and m.source.endswith(".yaml")]
    assert len(found) == 1, f"{len(found)} manifests of kind {kind}"
    return found[0]


def walk(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping in a YAML tree."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every mapping that has an ``env`` or a ``command``: containers, and the page's
    fragments of containers."""
    return [node for node in walk(manifest) if "env" in node or "command" in node]


def rdzv_conf(job: dict[str, Any]) -> dict[str, str]:
    return {item["key"]: str(item["value"]) for item in job["spec"]["elasticPolicy"]["rdzvConf"]}


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    """The pod template's spec of a workload (the first replica type of a PyTorchJob)."""
    spec = manifest["spec"]
    if "pytorchReplicaSpecs" in spec:
        spec = next(iter(spec["pytorchReplicaSpecs"].values()))
    return dict(spec["template"]["spec"])


# What reads what.

def operator_env(job: dict[str, Any]) -> dict[str, str]:
    """The PET_* variables Kubeflow's training-operator injects for ``job`` (kubeflow.org/v1,
    pkg/controller.v1/pytorch/elastic.go: rdzvHost:rdzvPort, minReplicas:maxReplicas, and the
    rdzvConf items joined as ``k=v,k=v``; rdzvPort is required here, not looked up)."""
    policy = job["spec"]["elasticPolicy"]
    env = {
        "PET_RDZV_ENDPOINT": f"{policy['rdzvHost']}:{policy['rdzvPort']}",
        "PET_RDZV_BACKEND": policy.get("rdzvBackend", "c10d"),
        "PET_NNODES": f"{policy['minReplicas']}:{policy['maxReplicas']}",
    }
    for field, name in (("maxRestarts", "PET_MAX_RESTARTS"), ("nProcPerNode",
                        "PET_NPROC_PER_NODE"), ("rdzvId", "PET_RDZV_ID")):
        if field in policy:
            env[name] = str(policy[field])
    if policy.get("rdzvConf"):
        env["PET_RDZV_CONF"] = ",".join(f"{key}={value}"
                                        for key, value in rdzv_conf(job).items())
    return env


def torchrun_reads(name: str, value: str) -> bool:
    """Whether torchrun takes ``value`` from ``$name`` as the flag of the same name."""
    if not name.startswith("PET_"):
        return False
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        args = get_args_parser().parse_args(["train.py"])
    finally:
        if saved is None:
            del os.environ[name]
        else:
            os.environ[name] = saved
    dest = name.removeprefix("PET_").lower()
    if not hasattr(args, dest):
        return False
    parsed = getattr(args, dest)
    return bool(parsed is True or str(parsed) == value
                or (isinstance(parsed, (int, float)) and parsed == float(value)))


@cache
def _torch_sources() -> str:
    package = Path(torch.distributed.__file__).parent
    return "\n".join(path.read_text(errors="replace") for path in package.rglob("*.py"))


@cache
def _flags(binary: str) -> frozenset[str]:
    """The ``--flags`` a binary's help lists."""
    command = [binary, "--help"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    return frozenset(re.findall(r"^\s+--([a-z0-9-]+)", result.stdout + result.stderr,
                                re.MULTILINE))


def script_variables() -> frozenset[str]:
    """The variables the ConfigMaps' scripts use."""
    return frozenset(name for m in manifests() if m.body.get("kind") == "ConfigMap"
                     for text in m.body.get("data", {}).values()
                     for name in _SHELL_VARIABLE.findall(text))


def why_not_read(name: str, value: str, container: dict[str, Any]) -> str | None:
    """None if some code reads ``$name``; else what was looked for."""
    if name.startswith("PET_"):
        return None if torchrun_reads(name, value) else "torchrun has no such flag"
    if name == PASSWORD_ENV_VAR:
        return None
    if name.startswith("ETCDCTL_"):
        flag = name.removeprefix("ETCDCTL_").lower().replace("_", "-")
        return None if flag in _flags(find_etcd_binary("etcdctl")) else "etcdctl has no --" + flag
    words = [*container.get("command", []), *container.get("args", [])]
    if any(name in _SUBSTITUTION.findall(str(word)) for word in words):
        return None
    if name in script_variables():
        return None
    if f'"{name}"' in _torch_sources():
        return None
    return "not a PET_ flag, nor etcd-rdzv's, etcdctl's or torch's, nor used by the container"


# Playing the kubelet: Secrets and ConfigMaps as files under a root directory.

def mount(spec: dict[str, Any], container: dict[str, Any], root: Path,
          secrets: Mapping[str, Mapping[str, str | bytes]]) -> None:
    """Write each Secret and ConfigMap the container mounts under ``root``."""
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    config_maps = {m.body["metadata"]["name"]: m.body.get("data", {}) for m in manifests()
                   if m.body.get("kind") == "ConfigMap"}
    for volume_mount in container.get("volumeMounts", []):
        volume = volumes[volume_mount["name"]]
        if "secret" in volume:
            files = secrets[volume["secret"]["secretName"]]
        elif "configMap" in volume:
            files = config_maps[volume["configMap"]["name"]]
        else:
            continue
        target = root / volume_mount["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        for key, content in files.items():
            (target / key).write_bytes(content if isinstance(content, bytes)
                                       else content.encode())


def secret_paths(spec: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """The mount paths of the container's Secret volumes."""
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    return [item["mountPath"].rstrip("/") + "/" for item in container.get("volumeMounts", [])
            if "secret" in volumes[item["name"]]]


def on_this_machine(value: str, root: Path) -> str:
    """A path inside the pod, as the file :func:`mount` wrote."""
    return str(root / value.lstrip("/")) if value.startswith("/") else value


# The manifests, read.

def test_every_manifest_loads_and_names_its_kind() -> None:
    found = manifests()
    kinds = {(m.body.get("kind"), m.body.get("metadata", {}).get("name")) for m in found
             if m.source.endswith(".yaml")}
    assert {("StatefulSet", "etcd"), ("Service", "etcd"), ("PyTorchJob", "elastic-train"),
            ("Job", "etcd-rdzv-auth-elastic-train"), ("ConfigMap", "etcd-rdzv-auth")} <= kinds
    for manifest in found:
        if manifest.source.endswith(".yaml"):
            assert {"apiVersion", "kind", "metadata"} <= set(manifest.body), manifest.source


def test_the_job_uses_the_backend_this_package_registers() -> None:
    job = the("PyTorchJob")
    backend = job["spec"]["elasticPolicy"]["rdzvBackend"]
    assert backend == "etcd-v3"
    assert backend in {point.name for point in entry_points(group="torchrun.handlers")}


def test_every_rdzv_conf_key_is_an_option_and_no_password_is_one() -> None:
    for manifest in manifests():
        for node in walk(manifest.body):
            if "rdzvConf" not in node:
                continue
            keys = [item["key"] for item in node["rdzvConf"]]
            unknown = set(keys) - BACKEND_OPTIONS - HANDLER_OPTIONS
            assert not unknown, f"{manifest.source}: options nobody reads: {sorted(unknown)}"
            assert "password" not in keys, manifest.source
            assert all("," not in str(item["value"]) for item in node["rdzvConf"])


def test_the_files_rdzv_conf_names_come_from_secrets_and_the_options_parse(
        tmp_path: Path) -> None:
    job = the("PyTorchJob")
    spec = pod_spec(job)
    container = spec["containers"][0]
    conf = rdzv_conf(job)
    mounted = secret_paths(spec, container)
    for name in FILE_OPTIONS & set(conf):
        assert any(conf[name].startswith(path) for path in mounted), \
            f"{name}={conf[name]} is not in a Secret mounted at {mounted}"
    secrets = {volume["secret"]["secretName"]: dict.fromkeys(("ca.crt", "tls.crt", "tls.key",
                                                              "password"), "x")
               for volume in spec["volumes"] if "secret" in volume}
    mount(spec, container, tmp_path, secrets)
    local = {key: on_this_machine(value, tmp_path) if key in FILE_OPTIONS else value
             for key, value in conf.items()}
    env = operator_env(job)
    config = RendezvousConfig.from_options(env["PET_RDZV_ENDPOINT"], env["PET_RDZV_ID"], local)
    assert config.etcd.uses_tls and config.etcd.username == conf["username"]
    assert config.etcd.password == "x"  # from password_file
    assert config.key_prefix == conf["key_prefix"]


def test_every_environment_name_is_one_the_code_reads() -> None:
    problems = []
    for manifest in manifests():
        for container in containers(manifest.body):
            for item in container.get("env", []):
                why = why_not_read(item["name"], str(item.get("value", "127.0.0.1")),
                                   container)
                if why:
                    problems.append(f"{manifest.source}: {item['name']}: {why}")
    assert not problems, "\n".join(problems)


def test_torchrun_reads_every_variable_the_operator_injects() -> None:
    env = operator_env(the("PyTorchJob"))
    assert set(env) == {"PET_RDZV_ENDPOINT", "PET_RDZV_BACKEND", "PET_NNODES",
                        "PET_MAX_RESTARTS", "PET_NPROC_PER_NODE", "PET_RDZV_ID",
                        "PET_RDZV_CONF"}
    for name, value in env.items():
        assert torchrun_reads(name, value), f"{name}={value}"


def test_the_container_runs_torchrun_with_no_rendezvous_flag() -> None:
    container = pod_spec(the("PyTorchJob"))["containers"][0]
    assert container["command"] == ["torchrun"]
    assert not [arg for arg in container.get("args", []) if arg.startswith("-")]


def test_the_agents_reach_every_etcd_member_over_tls() -> None:
    statefulset, service = the("StatefulSet"), the("Service")
    endpoints = parse_endpoints(operator_env(the("PyTorchJob"))["PET_RDZV_ENDPOINT"])
    name = statefulset["metadata"]["name"]
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert [endpoint.host for endpoint in endpoints] == [
        f"{name}-{index}.{service['metadata']['name']}"
        for index in range(statefulset["spec"]["replicas"])]
    client_port = next(port["port"] for port in service["spec"]["ports"]
                       if port["name"] == "client")
    assert {endpoint.port for endpoint in endpoints} == {client_port}
    assert rdzv_conf(the("PyTorchJob"))["protocol"] == "https"


def test_every_etcd_flag_is_one_etcd_knows() -> None:
    container = pod_spec(the("StatefulSet"))["containers"][0]
    flags = [arg.removeprefix("--").split("=", 1)[0] for arg in container["args"]]
    unknown = set(flags) - _flags(find_etcd_binary())
    assert not unknown, f"etcd has no {sorted(unknown)}"
    defined = {item["name"] for item in container["env"]}
    used = {name for arg in container["args"] for name in _SUBSTITUTION.findall(arg)}
    assert used <= defined


def test_the_role_is_the_jobs_prefix_and_user_and_password() -> None:
    job, auth_job = the("PyTorchJob"), the("Job")
    auth = pod_spec(auth_job)["containers"][0]
    env = {item["name"]: item.get("value") for item in auth["env"]}
    conf = rdzv_conf(job)
    assert env["KEY_PREFIX"] == conf["key_prefix"]
    assert env["RDZV_USER"] == conf["username"]

    def password_secret(spec: dict[str, Any], container: dict[str, Any], path: str) -> str:
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        mount_point = next(item for item in container["volumeMounts"]
                           if path.startswith(item["mountPath"].rstrip("/") + "/"))
        return str(volumes[mount_point["name"]]["secret"]["secretName"])

    agent_spec = pod_spec(job)
    assert password_secret(pod_spec(auth_job), auth, str(env["RDZV_PASSWORD_FILE"])) == \
        password_secret(agent_spec, agent_spec["containers"][0], conf["password_file"])


# Two pods, end to end.

_ROOT_PASSWORD = "root-pw-k8s"
_TRAINER_PASSWORD = "trainer-pw-k8s"
NODE_TIMEOUT = 120.0


@dataclass
class EtcdForPods:
    cluster: EtcdCluster
    certs: TlsCertificates
    key_prefix: str
    secrets: dict[str, dict[str, str | bytes]]


def run_auth_script(etcd: EtcdForPods, root: Path) -> str:
    """The manifest's auth Job, its script part, against ``etcd``."""
    job = the("Job")
    spec = pod_spec(job)
    container = spec["containers"][0]
    mount(spec, container, root, etcd.secrets)
    env = {item["name"]: on_this_machine(str(item["value"]), root) for item in container["env"]}
    env["ETCDCTL_ENDPOINTS"] = ",".join(f"https://{member.endpoint}"
                                        for member in etcd.cluster.members)
    env["KEY_PREFIX"] = etcd.key_prefix
    env["PATH"] = os.path.dirname(find_etcd_binary("etcdctl")) + os.pathsep + os.environ["PATH"]
    script = re.search(r"sh (/\S+\.sh)", " ".join(container["args"]))
    assert script, container["args"]
    result = subprocess.run(["sh", on_this_machine(script.group(1), root)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def etcd_for_pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdForPods]:
    """3 members with TLS and client certificates, authentication set up by the manifest's
    script (run twice, as a retried Job would)."""
    certs = make_certificates(tmp_path_factory.mktemp("pki"))
    client_tls: dict[str, str | bytes] = {
        "ca.crt": certs.ca_cert.read_bytes(), "tls.crt": certs.client_cert.read_bytes(),
        "tls.key": certs.client_key.read_bytes()}
    secrets: dict[str, dict[str, str | bytes]] = {
        "etcd-rdzv-client-tls": client_tls,
        "etcd-rdzv-root": {"password": _ROOT_PASSWORD + "\n"},
        "etcd-rdzv-trainer": {"password": _TRAINER_PASSWORD + "\n"},
    }
    with EtcdCluster(3, tls=certs, client_cert_auth=True) as cluster:
        etcd = EtcdForPods(cluster, certs, f"/rdzv-k8s-test/{uuid.uuid4().hex[:12]}", secrets)
        first = run_auth_script(etcd, tmp_path_factory.mktemp("auth-job"))
        again = run_auth_script(etcd, tmp_path_factory.mktemp("auth-job-retried"))
        listing = again[again.index("KV Read:"):]  # `role get`: read-write, this prefix only
        assert listing.count("(prefix ") == 2 and f"(prefix {etcd.key_prefix}/)" in listing
        assert first.endswith(listing)
        assert "created" not in again and "Enabled" not in again  # the retry made nothing
        yield etcd


def _trainer_config(etcd: EtcdForPods) -> EtcdConfig:
    return etcd.cluster.client_config(
        protocol="https", ca_cert=etcd.certs.ca_cert, ssl_cert=etcd.certs.client_cert,
        ssl_cert_key=etcd.certs.client_key, username="trainer", password=_TRAINER_PASSWORD,
        read_timeout=10.0, request_timeout=3.0)


def pod_env(etcd: EtcdForPods, root: Path, handler: str, password_from: str) -> dict[str, str]:
    """One pod's environment: what the operator injects, and the container's own env, with
    this machine's endpoints and files."""
    job = the("PyTorchJob")
    spec = pod_spec(job)
    container = spec["containers"][0]
    mount(spec, container, root, etcd.secrets)
    conf = {key: on_this_machine(value, root) if key in FILE_OPTIONS else value
            for key, value in rdzv_conf(job).items()}
    conf.update(handler=handler, key_prefix=etcd.key_prefix, last_call_timeout="1")
    env = operator_env({**job, "spec": {**job["spec"], "elasticPolicy": {
        **job["spec"]["elasticPolicy"], "rdzvConf": [{"key": k, "value": v}
                                                     for k, v in conf.items()]}}})
    env["PET_RDZV_ENDPOINT"] = etcd.cluster.get_endpoint()
    env["PET_RDZV_ID"] += f"-{handler}"
    for item in container["env"]:  # status.podIP is this machine's loopback
        env[item["name"]] = str(item.get("value", LOCAL_ADDR))
    if password_from == PASSWORD_ENV_VAR:  # the Secret as a variable instead of a file
        env["PET_RDZV_CONF"] = ",".join(f"{k}={v}" for k, v in conf.items()
                                        if k != "password_file")
        env[PASSWORD_ENV_VAR] = _TRAINER_PASSWORD
    return env


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("handler", "password_from"), [
    ("torch", "password_file"),
    ("native", PASSWORD_ENV_VAR),
])
def test_two_pods_configured_only_by_the_operators_variables_form_one_world(
        etcd_for_pods: EtcdForPods, tmp_path: Path, handler: str, password_from: str) -> None:
    env = pod_env(etcd_for_pods, tmp_path, handler, password_from)
    assert "password=" not in env["PET_RDZV_CONF"]
    assert env["PET_RDZV_BACKEND"] == "etcd-v3" and env["PET_NNODES"] == "2:4"
    nproc = int(env["PET_NPROC_PER_NODE"])
    # No torchrun flag: the script and its own arguments only.
    command = [*torchrun_executable(), str(TRAIN_SCRIPT), "--steps", "3"]
    pods = [TorchrunNode(name, command, torchrun_env(env)) for name in ("pod-0", "pod-1")]
    try:
        for pod in pods:
            pod.start()
        codes = {}
        for pod in pods:
            try:
                codes[pod.name] = pod.wait(NODE_TIMEOUT)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{pod.name} still runs after {NODE_TIMEOUT:g} s\n{describe(pods)}")
        assert set(codes.values()) == {0}, f"exit codes {codes}\n{describe(pods)}"
        results = sorted((line for pod in pods for line in pod.worker_lines("RESULT")),
                         key=lambda line: line.rank)
        world = 2 * nproc
        assert [line.rank for line in results] == list(range(world)), describe(pods)
        assert {line.world for line in results} == {world}
        assert {line.int_field("sum") for line in results} == {world * (world - 1) // 2}
        records = [record for pod in pods for record in pod.rendezvous()]
        assert sorted(record.node_rank for record in records) == [0, 1], describe(pods)
        assert len({record.round for record in records}) == 1
        for pod in pods:
            assert "nobody reads" not in pod.output()  # every PET_RDZV_CONF key was read
    finally:
        for pod in pods:
            pod.close()

    # The agents logged in as trainer, whose role reaches the job's prefix and nothing else.
    async def check() -> None:
        async with EtcdClient(_trainer_config(etcd_for_pods)) as client:
            keys = await client.get_prefix(f"{etcd_for_pods.key_prefix}/".encode(),
                                           Deadline.after(10))
            assert any(env["PET_RDZV_ID"].encode() in bytes(kv.key) for kv in keys.kvs)
            with pytest.raises(EtcdAuthError):
                await client.put(b"/outside-the-prefix", b"x", 0, Deadline.after(10))

    asyncio.run(check())


"""State scale: how many nodes fit etcd's request limit, and what one get and set cost.

    python -m benchmarks.state_scale [--quick] [--sizes 1000 10000 50000 100000] [--repeats 5]
                                     [--tolerance 100] [--max-request-bytes 1572864]

Capacity: the largest node count whose torch rendezvous state (``torch_state(n)``, a pickled
``_RendezvousState`` as torch's handler writes it) fits etcd's default 1.5 MiB request limit
(``--max-request-bytes``), found by bisection:

* etcd-v3, this project's stored form (header + zlib above 16 KiB), as its size guard
  computes the request (value + key + 512 bytes of framing);
* etcd-v2's stored form: the base64 of the state. etcd 3.5's v2 API does not apply
  ``--max-request-bytes``: its real ceiling is Go's 10 MiB limit on a form-encoded POST
  body, so that one is reported too (the body python-etcd sends: value, ttl, prevIndex).

Each capacity is checked against a real etcd: a write at the capacity succeeds.

Cost: one ``get_state`` and one ``set_state`` (current token) through torch's interface at
each size, for etcd-v3, etcd-v2 and c10d, beside the cost of torch's own ``pickle.loads`` of
that state (which the handler does after every read).
"""

from __future__ import annotations

import base64
import pickle
import statistics
import sys
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from etcd_rdzv.codec import StateCodec
from etcd_rdzv.config import DEFAULT_KEY_PREFIX, DEFAULT_MAX_REQUEST_BYTES
from etcd_rdzv.errors import StateTooLargeError
from etcd_rdzv.testing.states import torch_state

from . import _backends, _plots
from ._backends import C10D, ETCD_V2, ETCD_V3, KINDS, BenchServers
from ._common import Spread, Topic, Verdict, markdown_table, option

__all__ = ["TOPIC", "ScaleResults", "Settings", "collect"]


@dataclass(frozen=True)
class Settings:
    sizes: tuple[int, ...] = option((1_000, 10_000, 50_000, 100_000),
                                    "node counts whose get and set are timed")
    repeats: int = option(5, "calls per size and backend")
    tolerance: int = option(100, "the capacity's precision, in nodes")
    max_request_bytes: int = option(DEFAULT_MAX_REQUEST_BYTES,
                                    "etcd's request limit to search under")


QUICK = Settings(sizes=(1_000, 10_000), repeats=2, tolerance=500)
#: The target: this many nodes under etcd's default request limit.
CAPACITY_TARGET = 100_000
#: Go's net/http refuses a form body above this (``http: POST too large``).
GO_FORM_LIMIT = 10 << 20
#: torch's TCPStore (libuv server) refuses a value above this ("Invalid payload size").
TCPSTORE_PAYLOAD_LIMIT = 8 << 20
#: The run id of the capacity checks: the key counts in the request, so every check's key
#: has this length (``capacity-`` and 7 hex digits).
RUN_ID_TEMPLATE = "capacity-0000000"
KEY = f"{DEFAULT_KEY_PREFIX}/{RUN_ID_TEMPLATE}".encode()
V3_FORM, V2_FORM = "etcd-v3 (stored form: header + zlib)", "etcd-v2 (base64)"


def _v3_guard(max_request_bytes: int) -> Callable[[bytes], bool]:
    """This project's own size guard: what ``set_state`` refuses before sending."""
    codec = StateCodec(max_request_bytes=max_request_bytes)

    def fits(state: bytes) -> bool:
        try:
            codec.encode(state, key=KEY)
        except StateTooLargeError:
            return False
        return True

    return fits


def _v3_size(state: bytes) -> int:
    return len(StateCodec(max_request_bytes=1 << 30).encode(state, key=KEY)) + len(KEY)


def _v2_value_size(state: bytes) -> int:
    return len(base64.b64encode(state)) + len(KEY)


def _c10d_size(state: bytes) -> int:
    return len(base64.b64encode(state))


def _v2_body_size(state: bytes) -> int:
    """The form body python-etcd sends for torch's conditional write."""
    return len(urllib.parse.urlencode({"value": base64.b64encode(state).decode(), "ttl": 7200,
                                       "prevIndex": 10**9}))


@dataclass(frozen=True)
class Form:
    """A stored form and the limit it must fit."""

    label: str
    kind: str
    limit_text: str
    limit: int
    size: Callable[[bytes], int]
    """The bytes of a state in this form that the limit applies to."""
    guard: Callable[[bytes], bool] | None = None
    """The backend's own check, when it has one (it decides, not :attr:`size`)."""

    def fits(self, state: bytes) -> bool:
        return self.guard(state) if self.guard is not None else self.size(state) <= self.limit


def forms(max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> tuple[Form, ...]:
    """The stored forms and limits whose capacity is searched."""
    limit = f"{max_request_bytes / 1024**2:g} MiB request (etcd's --max-request-bytes" + \
        (", its default)" if max_request_bytes == DEFAULT_MAX_REQUEST_BYTES else ")")
    return (
        Form(V3_FORM, ETCD_V3, limit, max_request_bytes, _v3_size,
             _v3_guard(max_request_bytes)),
        Form(V2_FORM, ETCD_V2, limit, max_request_bytes, _v2_value_size),
        Form("etcd-v2 (base64), as etcd 3.5 really limits it", ETCD_V2,
             f"{GO_FORM_LIMIT / 1024**2:g} MiB form body (Go's limit; the v2 API ignores "
             "--max-request-bytes)", GO_FORM_LIMIT, _v2_body_size),
        Form("c10d (base64)", C10D,
             f"{TCPSTORE_PAYLOAD_LIMIT / 1024**2:g} MiB value (TCPStore's libuv server)",
             TCPSTORE_PAYLOAD_LIMIT, _c10d_size),
    )


def capacity(form: Form, tolerance: int) -> tuple[int, bytes]:
    """The largest n (within ``tolerance``) for which ``torch_state(n)`` fits ``form``, and
    that state.

    A state's size grows almost linearly with n, so the search interpolates between the
    bracket's sizes (each probe builds a state: seconds at 100,000 nodes), bisecting only
    when interpolation stops closing in. Each n is built once: ``torch_state`` stamps the
    heartbeats with the current time, so two builds of one n differ by a few compressed
    bytes, which at the limit decides.
    """
    states: dict[int, bytes] = {}

    def state(n: int) -> bytes:
        if n not in states:
            states[n] = torch_state(n)
        return states[n]

    probe = 2_000
    estimate = max(2, int(form.limit / (form.size(state(probe)) / probe)))
    low, high = max(1, int(estimate * 0.9)), int(estimate * 1.1) + 1
    while low > 1 and not form.fits(state(low)):
        low, high = max(1, low // 2), low
    while form.fits(state(high)):
        low, high = high, high * 2
    low_size, high_size = form.size(state(low)), form.size(state(high))
    previous_width = None
    while high - low > tolerance:
        width = high - low
        if previous_width is not None and width > previous_width // 2:
            middle = (low + high) // 2  # interpolation stalled: bisect once
        else:
            fraction = (form.limit - low_size) / max(1, high_size - low_size)
            middle = min(high - 1, max(low + 1, low + round(fraction * width)))
        previous_width = width
        if form.fits(state(middle)):
            low, low_size = middle, form.size(state(middle))
        else:
            high, high_size = middle, form.size(state(middle))
    return low, state(low)


@dataclass(frozen=True)
class Capacity:
    label: str
    limit: str
    nodes: int
    stored_bytes: int
    verified: str


@dataclass
class ScaleResults:
    capacities: list[Capacity] = field(default_factory=list)
    sizes: tuple[int, ...] = ()
    repeats: int = 0
    raw_bytes: dict[int, int] = field(default_factory=dict)
    stored_bytes: dict[tuple[str, int], int] = field(default_factory=dict)
    #: (kind, size, "get" | "set" | "loads") -> seconds per call
    samples: dict[tuple[str, int, str], list[float]] = field(default_factory=dict)
    errors: dict[tuple[str, int], str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def capacity(self, label: str) -> Capacity | None:
        return next((c for c in self.capacities if c.label == label), None)


def _describe(exc: BaseException) -> str:
    """The exception and the chain of its causes, briefly."""
    parts: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(parts) < 3:
        parts.append(f"{type(current).__name__}: {str(current)[:160]}")
        current = current.__cause__ or current.__context__
    return " <- ".join(parts)


def _verify(servers: BenchServers, kind: str, state: bytes, max_request_bytes: int) -> str:
    """Write ``state`` and read it back through ``kind``'s backend."""
    run_id = f"capacity-{uuid.uuid4().hex[:7]}"
    assert len(run_id) == len(RUN_ID_TEMPLATE)
    config: dict[str, object] = {"read_timeout": 60}
    if kind == ETCD_V3:
        config["max_request_bytes"] = max_request_bytes
    try:
        with _backends.backend_for(kind, servers.endpoint(kind), run_id, config) as backend:
            written = backend.set_state(state, None)
            if written is None or not written[2]:
                return "write refused"
            read = backend.get_state()
            return "written and read back" if read is not None and read[0] == state \
                else "read back differs"
    except Exception as exc:
        return f"failed: {_describe(exc)}"


def _time_calls(servers: BenchServers, kinds: Sequence[str], nodes: int, repeats: int,
                results: ScaleResults) -> None:
    state = torch_state(nodes)
    results.raw_bytes[nodes] = len(state)
    results.stored_bytes[(ETCD_V3, nodes)] = len(StateCodec(max_request_bytes=1 << 30).encode(
        state, key=KEY))
    results.stored_bytes[(ETCD_V2, nodes)] = len(base64.b64encode(state))
    results.stored_bytes[(C10D, nodes)] = len(base64.b64encode(state))
    loads = []
    for _ in range(repeats):
        started = time.perf_counter()
        pickle.loads(state)
        loads.append(time.perf_counter() - started)
    results.samples[("torch pickle.loads", nodes, "loads")] = loads
    opened = {}
    try:
        for kind in kinds:
            run_id = f"scale-{nodes}-{uuid.uuid4().hex[:8]}"
            manager = _backends.backend_for(kind, servers.endpoint(kind), run_id,
                                            {"read_timeout": 60})
            backend = manager.__enter__()
            opened[kind] = (manager, backend)
            try:
                created = backend.set_state(state, None)
                if created is None or not created[2]:
                    raise RuntimeError("creating the state failed")
            except Exception as exc:
                results.errors[(kind, nodes)] = _describe(exc)
        tokens = {kind: None for kind in opened}
        for index in range(repeats):
            shift = index % len(kinds)
            for kind in list(kinds[shift:]) + list(kinds[:shift]):
                if kind not in opened or (kind, nodes) in results.errors:
                    continue
                backend = opened[kind][1]
                started = time.perf_counter()
                current = backend.get_state()
                got = time.perf_counter() - started
                assert current is not None
                token = current[1] if tokens[kind] is None else tokens[kind]
                started = time.perf_counter()
                result = backend.set_state(state, token)
                put = time.perf_counter() - started
                if result is None or not result[2]:
                    raise RuntimeError(f"{kind}: a write with the current token failed")
                tokens[kind] = result[1]
                results.samples.setdefault((kind, nodes, "get"), []).append(got)
                results.samples.setdefault((kind, nodes, "set"), []).append(put)
    finally:
        for manager, _backend in opened.values():
            manager.__exit__(None, None, None)


def collect(settings: Settings, say: Callable[[str], None]) -> ScaleResults:
    sizes, repeats, tolerance, max_request_bytes = (
        settings.sizes, settings.repeats, settings.tolerance, settings.max_request_bytes)
    results = ScaleResults(sizes=tuple(sizes), repeats=repeats)
    reason = _backends.v2_unavailable()
    kinds = [k for k in KINDS if k != ETCD_V2 or reason is None]
    if reason is not None:
        results.skipped[ETCD_V2] = reason
    extra = () if max_request_bytes == DEFAULT_MAX_REQUEST_BYTES \
        else (f"--max-request-bytes={max_request_bytes}",)
    with BenchServers(extra_args=extra) as servers:
        for form in forms(max_request_bytes):
            started = time.monotonic()
            nodes, state = capacity(form, tolerance)
            verified = _verify(servers, form.kind, state, max_request_bytes) \
                if form.kind in kinds else "not run"
            results.capacities.append(Capacity(form.label, form.limit_text, nodes,
                                               form.size(state), verified))
            say(f"state scale: {form.label}: {nodes:,} nodes ({verified}; "
                f"{time.monotonic() - started:.0f} s)")
        for nodes in sizes:
            _time_calls(servers, kinds, nodes, repeats, results)
            say(f"state scale: {nodes:,} nodes timed")
    return results


def _ms(samples: list[float] | None) -> str:
    return "n/a" if not samples else Spread.of(samples).format(scale=1000, digits=1)


def capacity_table(results: ScaleResults) -> str:
    rows = [[c.label, c.limit, f"{c.nodes:,}", f"{c.stored_bytes:,}", c.verified]
            for c in results.capacities]
    return markdown_table(["stored form", "limit", "largest node count",
                           "bytes the limit counts, at it", "checked on etcd"], rows, "llrrl")


def cost_table(results: ScaleResults) -> str:
    rows = []
    kinds = [k for k in KINDS if k not in results.skipped]
    for nodes in results.sizes:
        cells: list[object] = [f"{nodes:,}", f"{results.raw_bytes.get(nodes, 0):,}",
                               f"{results.stored_bytes.get((ETCD_V3, nodes), 0):,}"]
        for kind in kinds:
            for op in ("get", "set"):
                if (kind, nodes) in results.errors:
                    cells.append("refused" if op == "set" else "-")
                else:
                    cells.append(_ms(results.samples.get((kind, nodes, op))))
        cells.append(_ms(results.samples.get(("torch pickle.loads", nodes, "loads"))))
        rows.append(cells)
    header = ["nodes", "pickled state B", "etcd-v3 stored B"]
    for kind in kinds:
        header += [f"{kind} get ms", f"{kind} set ms"]
    header.append("torch pickle.loads ms")
    return markdown_table(header, rows)


def fragments(results: ScaleResults) -> dict[str, str]:
    v3, v2 = results.capacity(V3_FORM), results.capacity(V2_FORM)
    return {
        "capacity_table": capacity_table(results),
        "capacity_ratio": "" if v3 is None or v2 is None else
        f"etcd-v3 holds {v3.nodes / v2.nodes:.1f}x the nodes etcd-v2 can under the same "
        "request limit.",
        "repeats": str(results.repeats),
        "cost_table": cost_table(results),
        "errors": "\n".join(f"- {kind} at {nodes:,} nodes: {error}"
                            for (kind, nodes), error in sorted(results.errors.items())),
    }


def verdicts(results: ScaleResults) -> list[Verdict]:
    found = results.capacity(V3_FORM)
    return [Verdict(
        "capacity", f"state capacity of at least {CAPACITY_TARGET:,} nodes under the default "
        "request limit", "n/a" if found is None else
        f"{found.nodes:,} nodes ({found.nodes / CAPACITY_TARGET:.2f}x the target)",
        None if found is None else found.nodes >= CAPACITY_TARGET,
        "" if found is None else f"{(1 - found.nodes / CAPACITY_TARGET) * 100:.0f}% short")]


def plot(results: ScaleResults, directory: Path) -> list[Path]:
    plt = _plots.pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    for kind in KINDS:
        for op, style in (("get", ":"), ("set", "-")):
            xs, ys = [], []
            for nodes in results.sizes:
                samples = results.samples.get((kind, nodes, op))
                if samples:
                    xs.append(nodes)
                    ys.append(statistics.median(samples) * 1000)
            if xs:
                axes.plot(xs, ys, marker="o", linestyle=style, label=f"{kind} {op}_state",
                          color=_plots.COLORS.get(kind, "#333"))
    xs = [n for n in results.sizes if ("torch pickle.loads", n, "loads") in results.samples]
    axes.plot(xs, [statistics.median(results.samples[("torch pickle.loads", n, "loads")])
                   * 1000 for n in xs], marker="x", color="#7f7f7f", linestyle="--",
              label="torch pickle.loads")
    for capacity in results.capacities[:2]:
        axes.axvline(capacity.nodes, color=_plots.COLORS.get(
            ETCD_V3 if capacity.label.startswith(ETCD_V3) else ETCD_V2, "#333"), alpha=0.4,
            linestyle="-.")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("nodes in the state (vertical lines: capacity under the request limit)")
    axes.set_ylabel("ms per call (median)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    axes.set_title("Cost of one call against the state's size")
    return [_plots.save(figure, directory / "state_scale.png")]


TOPIC: Topic[Settings, ScaleResults] = Topic(
    "scale", __name__, Settings(), QUICK, collect, fragments, plot, verdicts)

if __name__ == "__main__":
    from .run_all import main

    sys.exit(main(topic=TOPIC.name))

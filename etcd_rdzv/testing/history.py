"""Record ``get_state``/``set_state`` histories and check them for linearizability.

A rendezvous backend is a single register with compare-and-swap, so its histories can be
checked directly, without a general search (porcupine-style) over interleavings:

* successful writes form one chain: each one's token in is its predecessor's token out;
* no two successful writes share a token in;
* every read (a ``get_state``, or the state a conflicted ``set_state`` returns) returns a
  value some write produced, with that write's token;
* no read returns a state older than a write that completed before the read began.

Every written value must be unique (:func:`unique_state`). A write that raised has an unknown
outcome: it counts as successful if and only if some read saw its value.

A lighter check needs no history: :func:`count_increments` has writers increment a counter
held in the state, and the counter must end at the sum of their successes.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["History", "Operation", "count_increments", "run_clients", "unique_state"]

_counter = itertools.count()


def unique_state(client: int) -> bytes:
    """A state value no other call in the process writes."""
    return b"client-%d-write-%d" % (client, next(_counter))


@dataclass
class Operation:
    """One call: what went in, what came out, and when (``time.monotonic``)."""

    client: int
    kind: str  # "get" or "set"
    invoked: float
    completed: float = 0.0
    token_in: int | None = None
    written: bytes | None = None
    state: bytes | None = None
    token_out: int | None = None
    ok: bool | None = None
    error: str | None = None


@dataclass
class History:
    """A list of operations with the checker over it."""

    operations: list[Operation] = field(default_factory=list)

    async def record_get(self, client: int, call: Callable[[], Awaitable[Any]]) -> Any:
        """Await ``call()`` (a ``get_state``) and record it."""
        op = Operation(client, "get", time.monotonic())
        result = await self._record(op, call())
        if result is not None:
            op.state, op.token_out = result
        return result

    async def record_set(
        self, client: int, state: bytes, token: int | None,
        call: Callable[[bytes, int | None], Awaitable[Any]],
    ) -> Any:
        """Await ``call(state, token)`` (a ``set_state``) and record it."""
        op = Operation(client, "set", time.monotonic(), token_in=token, written=state)
        result = await self._record(op, call(state, token))
        if result is not None:
            op.state, op.token_out, op.ok = result
        return result

    async def _record(self, op: Operation, call: Awaitable[Any]) -> Any:
        self.operations.append(op)
        try:
            return await call
        except Exception as exc:
            op.error = repr(exc)
            raise
        finally:
            op.completed = time.monotonic()

    def check(self, initial: tuple[bytes, int] | None = None) -> list[str]:
        """Return every violation found (empty when the history is linearizable)."""
        violations: list[str] = []
        done = [op for op in self.operations if op.completed]
        writes = {op.written: op for op in done if op.kind == "set" and op.written is not None}
        reads = [op for op in done if op.error is None and op.state is not None
                 and not (op.kind == "set" and op.ok)]
        seen = {op.state for op in reads}
        # token_out of every write that took effect: known successes, and unknown outcomes
        # whose value a read saw (then the read tells the token).
        effective: dict[int, Operation] = {}
        for op in done:
            if op.kind != "set":
                continue
            if op.ok:
                token = op.token_out
            elif op.error is not None and op.written in seen:
                token = next(r.token_out for r in reads if r.state == op.written)
            else:
                continue
            assert token is not None
            if token in effective:
                violations.append(f"two writes produced token {token}: {effective[token]} "
                                  f"and {op}")
            effective[token] = op
        chain = sorted(effective)
        token_ins: dict[int | None, Operation] = {}
        previous = initial[1] if initial else None
        for token in chain:
            op = effective[token]
            if op.token_in in token_ins:
                violations.append(f"two successful writes used token {op.token_in}: "
                                  f"{token_ins[op.token_in]} and {op}")
            token_ins[op.token_in] = op
            if op.token_in != previous:
                violations.append(f"write to token {token} used token {op.token_in}, but the "
                                  f"previous write in the chain produced {previous}: {op}")
            previous = token
        produced = {effective[t].written: t for t in chain}
        if initial is not None:
            produced[initial[0]] = initial[1]
        # The newest token any acknowledged write had reached by each completion time.
        acknowledged = sorted((effective[t].completed, t) for t in chain if effective[t].ok)
        completion_times = [completed for completed, _ in acknowledged]
        newest_by_then = list(itertools.accumulate((t for _, t in acknowledged), max))
        for read in reads:
            if read.state not in produced:
                origin = "a write that failed" if read.state in writes else "no write"
                violations.append(f"read returned a value produced by {origin}: {read}")
                continue
            if produced[read.state] != read.token_out:
                violations.append(f"read returned token {read.token_out} for a value written "
                                  f"at token {produced[read.state]}: {read}")
            done_before = bisect.bisect_left(completion_times, read.invoked)
            if done_before and newest_by_then[done_before - 1] > (read.token_out or 0):
                violations.append(f"read returned token {read.token_out}, older than write "
                                  f"{newest_by_then[done_before - 1]} which completed before "
                                  f"it began: {read}")
        return violations

    @property
    def counts(self) -> dict[str, int]:
        done = [op for op in self.operations if op.completed]
        return {
            "operations": len(done),
            "gets": sum(op.kind == "get" for op in done),
            "sets": sum(op.kind == "set" for op in done),
            "successful_sets": sum(bool(op.ok) for op in done),
            "errors": sum(op.error is not None for op in done),
        }


async def run_clients(
    history: History,
    backends: list[Any],
    duration: float,
    initial_token: int,
) -> None:
    """Drive each backend as one client for ``duration`` s: read, then CAS, repeatedly."""

    async def client(index: int, backend: Any) -> None:
        token: int | None = initial_token
        stop = time.monotonic() + duration
        while time.monotonic() < stop:
            try:
                if token is None:
                    current = await history.record_get(index, backend.get_state)
                    token = current[1] if current else None
                    continue
                result = await history.record_set(index, unique_state(index), token,
                                                  backend.set_state)
                token = result[1] if result else None
            except Exception:
                token = None  # unknown outcome or unreachable: start again from a read
                await asyncio.sleep(0.05)

    await asyncio.gather(*(client(i, b) for i, b in enumerate(backends)))


async def count_increments(backend: Any, *, attempts: int | None = None,
                           until: asyncio.Event | None = None) -> int:
    """CAS increments of the decimal counter that is ``backend``'s state, ``attempts`` times
    or until ``until`` is set; the number that succeeded.

    Each attempt starts from the state and token the last one returned (a conflict returns
    the current ones), so a lost or doubled write shows as a counter that differs from the
    sum of every writer's successes.
    """
    current = await backend.get_state()
    assert current is not None, "count_increments needs a counter in the state"
    state, token = current
    successes = tried = 0
    while (attempts is None or tried < attempts) and not (until is not None and until.is_set()):
        result = await backend.set_state(b"%d" % (int(state) + 1), token)
        assert result is not None
        state, token, has_set = result
        successes += has_set
        tried += 1
    return successes

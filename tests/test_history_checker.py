"""The linearizability checker must catch what it claims to catch (pure, no etcd needed)."""

from __future__ import annotations

from etcd_rdzv.testing.history import History, Operation


def write(client: int, t0: float, t1: float, token_in: int | None, value: bytes,
          token_out: int, ok: bool = True, state: bytes | None = None) -> Operation:
    return Operation(client, "set", t0, t1, token_in=token_in, written=value,
                     state=value if ok else state, token_out=token_out, ok=ok)


def read(client: int, t0: float, t1: float, value: bytes, token: int) -> Operation:
    return Operation(client, "get", t0, t1, state=value, token_out=token)


INITIAL = (b"init", 1)


def test_a_clean_history_passes() -> None:
    history = History([
        write(0, 0, 1, 1, b"a", 2),
        write(1, 0.5, 1.5, 1, b"b", 2, ok=False, state=b"a"),
        read(2, 2, 3, b"a", 2),
        write(1, 2, 3, 2, b"c", 3),
        read(0, 4, 5, b"c", 3),
    ])
    assert history.check(INITIAL) == []


def test_two_successes_on_one_token_are_caught() -> None:
    history = History([write(0, 0, 1, 1, b"a", 2), write(1, 0, 1, 1, b"b", 3)])
    assert any("used token 1" in v for v in history.check(INITIAL))


def test_a_broken_chain_is_caught() -> None:
    history = History([write(0, 0, 1, 1, b"a", 2), write(1, 2, 3, 7, b"b", 8)])
    assert any("previous write in the chain produced 2" in v for v in history.check(INITIAL))


def test_a_stale_read_is_caught() -> None:
    history = History([write(0, 0, 1, 1, b"a", 2), read(1, 2, 3, b"init", 1)])
    assert any("older than write 2" in v for v in history.check(INITIAL))


def test_a_read_of_a_value_nobody_wrote_is_caught() -> None:
    history = History([read(0, 0, 1, b"ghost", 5)])
    assert any("produced by no write" in v for v in history.check(INITIAL))


def test_a_read_of_a_failed_write_is_caught() -> None:
    history = History([
        write(0, 0, 1, 1, b"a", 2),
        write(1, 0, 1, 1, b"lost", 2, ok=False, state=b"a"),
        read(2, 2, 3, b"lost", 2),
    ])
    assert any("a write that failed" in v for v in history.check(INITIAL))


def test_an_unknown_outcome_seen_by_a_read_joins_the_chain() -> None:
    unknown = Operation(0, "set", 0, 1, token_in=1, written=b"maybe", error="timeout")
    history = History([unknown, read(1, 2, 3, b"maybe", 2), write(1, 3, 4, 2, b"next", 3)])
    assert history.check(INITIAL) == []

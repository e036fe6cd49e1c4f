"""Option parsing: every option's default, accepted forms, and the error for a bad value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from etcd_rdzv.config import (
    DEFAULT_KEY_PREFIX,
    PASSWORD_ENV_VAR,
    Endpoint,
    EtcdConfig,
    RendezvousConfig,
    parse_endpoints,
)


def parse(endpoint: str | None = "localhost:2379", **options: Any) -> RendezvousConfig:
    return RendezvousConfig.from_options(endpoint, "run", options)


def written(path: Path, text: str = "x") -> str:
    """``path``, as an option value, after writing ``text`` to it."""
    path.write_text(text)
    return str(path)


def test_defaults_match_torch_etcd_v2() -> None:
    config = parse()
    assert config.etcd.read_timeout == 60
    assert config.etcd.protocol == "http"
    assert config.key_prefix == DEFAULT_KEY_PREFIX == "/torch/elastic/rendezvous"
    assert config.ttl == 7200
    assert config.etcd.ca_cert is None and config.etcd.ssl_cert is None
    assert config.etcd.username is None and config.etcd.password is None
    assert config.max_request_bytes == 1536 * 1024
    assert (config.conflict_backoff, config.wait) == (0.0, "poll")


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        (None, [Endpoint("localhost", 2379)]),
        ("", [Endpoint("localhost", 2379)]),
        ("etcd-1", [Endpoint("etcd-1", 2379)]),
        ("10.0.0.1:32379", [Endpoint("10.0.0.1", 32379)]),
        ("[::1]:2379", [Endpoint("::1", 2379)]),
        ("[fe80::1%eth0]", [Endpoint("fe80::1%eth0", 2379)]),
        (" h1:1, h2:2 ,h1:1", [Endpoint("h1", 1), Endpoint("h2", 2)]),
    ],
)
def test_endpoints_parse(endpoint: str | None, expected: list[Endpoint]) -> None:
    assert list(parse_endpoints(endpoint)) == expected


def test_endpoints_print_as_written() -> None:
    assert parse_endpoints("[::1]:5,h:6")[0].__str__() == "[::1]:5"
    assert parse("[::1]:5,h:6").etcd.targets == "[::1]:5,h:6"


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("h:99999", "port number of the endpoint 'h:99999'"),
        ("h:0", "port number of the endpoint 'h:0'"),
        ("h:port", "port number of the endpoint 'h:port'"),
        ("::1:2379", "bare IPv6 address"),
        ("[::1", "not a valid IPv6 endpoint"),
        ("[::1]x", "not a valid IPv6 endpoint"),
        ("bad host!", "hostname of the endpoint 'bad host!'"),
        ("h1,,h2", "has an empty entry"),
    ],
)
def test_bad_endpoints_are_named(endpoint: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse(endpoint)
    assert repr(endpoint.strip()) in str(info.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"protocol": "dummy"}, r"^The protocol must be HTTP or HTTPS\. Got protocol='dummy'"),
        ({"read_timeout": "0"}, r"^The read timeout must be a positive integer\..*'0'"),
        ({"read_timeout": "-10"}, r"^The read timeout must be a positive integer\..*'-10'"),
        ({"read_timeout": "1.5"}, r"^The read timeout must be a positive integer\..*'1\.5'"),
        ({"read_timeout": "abc"}, r"^The read timeout must be a positive integer\..*'abc'"),
        ({"ttl": "0"}, r"ttl must be an integer of at least 1, got ttl='0'"),
        ({"ttl": "2h"}, r"ttl must be an integer of at least 1, got ttl='2h'"),
        ({"key_prefix": "/"}, r"key_prefix must be a non-empty etcd key path.*key_prefix='/'"),
        ({"compress_threshold": "-1"},
         r"compress_threshold must be .* got compress_threshold='-1'"),
        ({"max_request_bytes": "100"},
         r"max_request_bytes must be .*4096, got max_request_bytes='100'"),
        ({"request_timeout": "0"}, r"request_timeout must be a positive number .*'0'"),
        ({"request_timeout": "nan"}, r"request_timeout must be a positive number .*'nan'"),
        ({"connect_timeout": "-1"}, r"connect_timeout must be a positive number .*'-1'"),
        ({"conflict_backoff": "-0.1"},
         r"conflict_backoff must be a number of seconds from 0 to 1, got conflict_backoff='-0.1'"),
        ({"conflict_backoff": "5"}, r"conflict_backoff must be .*, got conflict_backoff='5'"),
        ({"compact_interval": "0.5"},
         r"compact_interval must be 0 \(off\) or a number of seconds of at least 1, "
         r"got compact_interval='0.5'"),
        ({"wait": "sleep"}, r"^The option wait must be 'poll' or 'watch', got wait='sleep'"),
        ({"password": "hunter2"}, r"option password is not accepted.*password_file"),
        ({"username": "root"}, r"needs both a username and a password; password"),
        ({"protocol": "https", "ca_cert": "/no/such/ca.pem"},
         r"ca_cert='/no/such/ca.pem' does not exist"),
        ({"protocol": "https", "ssl_cert": "/no/such/c.pem"},
         r"ssl_cert='/no/such/c.pem' does not exist"),
        ({"password_file": "/no/such/pw", "username": "u"},
         r"password_file='/no/such/pw' does not exist"),
    ],
)
def test_bad_options_name_the_option_and_value(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(**options)


def test_tls_files_need_https(tmp_path: Path) -> None:
    ca = written(tmp_path / "ca.pem")
    with pytest.raises(ValueError, match=r"ca_cert='.*ca.pem' needs protocol=https"):
        parse(ca_cert=ca)
    assert parse(ca_cert=ca, protocol="HTTPS").etcd.ca_cert == Path(ca)


def test_ssl_cert_key_needs_ssl_cert(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"ssl_cert_key=.* needs ssl_cert"):
        parse(protocol="https", ssl_cert_key=written(tmp_path / "k.pem"))


def test_unreadable_tls_file_is_named(tmp_path: Path) -> None:
    directory = tmp_path / "dir.pem"
    directory.mkdir()
    with pytest.raises(ValueError, match=r"ca_cert=.*dir.pem' does not exist or is not a regular"):
        parse(protocol="https", ca_cert=str(directory))


def test_password_comes_from_a_file(tmp_path: Path) -> None:
    config = parse(username="alice", password_file=written(tmp_path / "pw", "s3cret\n"))
    assert (config.etcd.username, config.etcd.password) == ("alice", "s3cret")
    assert "s3cret" not in repr(config)


def test_empty_password_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"password_file=.* is empty"):
        parse(username="alice", password_file=written(tmp_path / "pw", "\n"))


def test_password_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSWORD_ENV_VAR, "from-env")
    assert parse(username="bob").etcd.password == "from-env"


def test_password_without_username_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no username"):
        parse(password_file=written(tmp_path / "pw"))


def test_values_are_parsed_once_into_typed_fields() -> None:
    config = parse(
        "h1:1,h2:2", read_timeout="7", request_timeout="0.5", connect_timeout="3",
        ttl="30", key_prefix="/jobs/", compress_threshold="0", max_request_bytes="4096",
        protocol=" HTTP ", conflict_backoff="0.05", wait="watch",
    )
    assert (config.conflict_backoff, config.wait) == (0.05, "watch")
    assert config.etcd.read_timeout == 7.0
    assert config.etcd.request_timeout == 0.5
    assert config.etcd.connect_timeout == 3.0
    assert (config.ttl, config.key_prefix) == (30, "/jobs")
    assert (config.compress_threshold, config.max_request_bytes) == (0, 4096)
    assert config.etcd.endpoints == (Endpoint("h1", 1), Endpoint("h2", 2))


def test_handler_options_pass_through_without_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    parse(join_timeout="5", last_call_timeout="1", keep_alive_interval="2", rank="0",
          timeout="900")
    assert "Ignoring" not in caplog.text


def test_a_misspelled_option_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    parse(ttll="30")
    assert "Ignoring rendezvous options nobody reads: ttll" in caplog.text


def test_configs_are_frozen() -> None:
    config = parse()
    with pytest.raises(AttributeError):
        config.ttl = 1  # type: ignore[misc]


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ValueError, match="read_timeout must be a positive number"):
        EtcdConfig(read_timeout=0)
    with pytest.raises(ValueError, match="at least one etcd endpoint"):
        EtcdConfig(endpoints=())


@pytest.mark.parametrize("run_id", ["", "  ", "a/store/x"])
def test_bad_run_ids_are_named(run_id: str) -> None:
    with pytest.raises(ValueError, match=r"run id must be a non-empty string without '/'"):
        RendezvousConfig.from_options("localhost", run_id, {})

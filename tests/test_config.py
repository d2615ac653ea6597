"""The config loader: value parsers, defaults, every error naming its key path, the reference file."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from mta.config import (
    AuthConfig,
    BounceConfig,
    Config,
    ConnectionCacheConfig,
    DeliveryConfig,
    DNSConfig,
    DSNConfig,
    LimitsConfig,
    ListenerConfig,
    MailboxesConfig,
    RetryConfig,
    SmarthostConfig,
    TimeoutsConfig,
    TLSConfig,
    build_config,
    load_config,
    parse_duration,
    parse_hostport,
    parse_size,
)
from mta.errors import ConfigError
from tests.support.daemon import ROOT, mta_command, subprocess_env

pytestmark = pytest.mark.timeout(30)

REFERENCE = ROOT / "config" / "mta.yaml"


def error_of(data) -> str:
    """The one-line message build_config raises for ``data``."""
    with pytest.raises(ConfigError) as info:
        build_config(data)
    return str(info.value)


# --------------------------------------------------------------------------- parse_duration

@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0), ("5d", 432000.0), ("1w", 604800.0),
    ("250ms", 0.25), ("1.5h", 5400.0), ("90", 90.0), (" 10s ", 10.0),
    (45, 45.0), (0, 0.0), (2.5, 2.5),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text, "x") == seconds


@pytest.mark.parametrize(("value", "message"), [
    ("5x", 'retry.min_backoff: "5x" is not a duration'),
    ("", 'retry.min_backoff: "" is not a duration'),
    ("-5s", 'retry.min_backoff: "-5s" is not a duration'),
    ("5 minutes", 'retry.min_backoff: "5 minutes" is not a duration'),
    (-1, "retry.min_backoff: -1 is not a duration (negative)"),
    (True, "retry.min_backoff: True is not a duration"),
    ([5], "retry.min_backoff: [5] is not a duration"),
])
def test_parse_duration_rejects(value, message):
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "retry.min_backoff")
    assert str(info.value) == message
    assert info.value.path == "retry.min_backoff"


# --------------------------------------------------------------------------- parse_size

@pytest.mark.parametrize(("text", "size"), [
    (0, 0), (10240000, 10240000), ("512", 512), ("512B", 512),
    ("10KB", 10_000), ("10MB", 10_000_000), ("1GB", 10**9), ("10k", 10_000), ("10M", 10_000_000),
    ("10KiB", 10 * 1024), ("10MiB", 10 * 1024**2), ("1GiB", 1024**3), ("10mib", 10 * 1024**2),
    ("1.5MB", 1_500_000), (" 2 MB ", 2_000_000),
])
def test_parse_size(text, size):
    assert parse_size(text, "x") == size


@pytest.mark.parametrize(("value", "message"), [
    ("10XB", 'limits.message_size: "10XB" is not a size'),
    ("MB", 'limits.message_size: "MB" is not a size'),
    ("-1", 'limits.message_size: "-1" is not a size'),
    (-1, "limits.message_size: -1 is not a size (negative)"),
    (1.5, "limits.message_size: 1.5 is not a size"),
    (False, "limits.message_size: False is not a size"),
])
def test_parse_size_rejects(value, message):
    with pytest.raises(ConfigError) as info:
        parse_size(value, "limits.message_size")
    assert str(info.value) == message


# --------------------------------------------------------------------------- parse_hostport

@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:2525", ("127.0.0.1", 2525)),
    ("[::1]:2525", ("::1", 2525)),
    ("[::]:25", ("::", 25)),
    ("[::ffff:192.0.2.1]:587", ("::ffff:192.0.2.1", 587)),
    ("mail.example.net:587", ("mail.example.net", 587)),
    ("localhost:1", ("localhost", 1)),
    ("localhost:65535", ("localhost", 65535)),
    ("  relay.test:25 ", ("relay.test", 25)),
])
def test_parse_hostport(text, expected):
    assert parse_hostport(text, "x") == expected


def test_parse_hostport_default_port():
    assert parse_hostport("mail.example.net", "x", default_port=25) == ("mail.example.net", 25)
    assert parse_hostport("[2001:db8::1]", "x", default_port=25) == ("2001:db8::1", 25)
    assert parse_hostport("mail.example.net:2525", "x", default_port=25) == ("mail.example.net", 2525)


@pytest.mark.parametrize(("value", "message"), [
    ("localhost", '"localhost" is not an address (want host:port)'),   # no port, none by default
    ("::1:2525", '"::1:2525" is not an address (want host:port)'),     # IPv6 needs brackets
    ("host:port", '"host:port" is not an address (want host:port)'),
    ("host:-1", '"host:-1" is not an address (want host:port)'),
    ("", '"" is not an address (want host:port)'),
    (2525, "2525 is not an address (want host:port)"),
    (None, "None is not an address (want host:port)"),
    ("host:0", '"host:0" has a port outside 1-65535'),
    ("host:65536", '"host:65536" has a port outside 1-65535'),
    ("[::1]:99999", '"[::1]:99999" has a port outside 1-65535'),
])
def test_parse_hostport_rejects(value, message):
    with pytest.raises(ConfigError) as info:
        parse_hostport(value, "listeners[0].address")
    assert str(info.value) == f"listeners[0].address: {message}"


# --------------------------------------------------------------------------- defaults

def test_defaults_without_a_file(monkeypatch):
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setattr("mta.config.socket.getfqdn", lambda: "relay.lab.test")
    config = load_config(None)
    assert config.source == "<built-in defaults>"
    assert config.hostname == "relay.lab.test"
    assert config.listeners == (ListenerConfig(name="mta", host="127.0.0.1", port=2525, mode="relay"),)
    assert config.listeners[0].address == "127.0.0.1:2525"
    assert config.queue.path == "var/queue.db"
    assert config.mynetworks == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert config.relay_domains == ()
    assert config.auth.users_file is None
    assert config.delivery.smarthost is None
    assert config.delivery.routes == ()
    assert config.delivery.tls == "may"
    assert config.delivery.port == 25
    assert (config.delivery.retry.min_backoff, config.delivery.retry.max_backoff,
            config.delivery.retry.max_lifetime, config.delivery.retry.delay_warning) == \
        (300, 3600, 432000, None)
    assert config.limits.message_size == 10_000_000
    assert config.limits.max_hops == 50
    assert (config.metrics.host, config.metrics.port) == ("127.0.0.1", 9101)


def test_empty_file_is_the_defaults(tmp_path, monkeypatch):
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing set\n")
    config = load_config(path)
    assert config.source == str(path)
    assert dataclasses.replace(config, source="<built-in defaults>") == build_config({})


def test_queue_path_follows_state_directory(monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/mta")
    assert build_config({}).queue.path == "/var/lib/mta/queue.db"
    # systemd passes several StateDirectory= entries separated by ':'; the first is the queue's.
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/mta:/var/lib/other")
    assert build_config({}).queue.path == "/var/lib/mta/queue.db"
    # An explicit queue.path wins over the environment.
    assert build_config({"queue": {"path": "/srv/q.db"}}).queue.path == "/srv/q.db"
    monkeypatch.setenv("STATE_DIRECTORY", "")
    assert build_config({}).queue.path == "var/queue.db"


def test_hostname_default_falls_back_to_localhost(monkeypatch):
    monkeypatch.setattr("mta.config.socket.getfqdn", lambda: "not a host name")
    monkeypatch.setattr("mta.config.socket.gethostname", lambda: "nor this")
    assert build_config({}).hostname == "localhost"
    assert build_config({"hostname": "relay.lab.test"}).hostname == "relay.lab.test"


def test_values_in_units():
    config = build_config({
        "delivery": {"retry": {"min_backoff": "30s", "max_backoff": "2h", "max_lifetime": "5d",
                               "delay_warning": "4h"},
                     "timeouts": {"connect": 10}},
        "limits": {"message_size": "10MiB", "idle_timeout": "5m", "max_hops": 25},
    })
    assert config.delivery.retry == dataclasses.replace(
        config.delivery.retry, min_backoff=30.0, max_backoff=7200.0, max_lifetime=432000.0,
        delay_warning=14400.0)
    assert config.delivery.timeouts.connect == 10.0
    assert config.limits.message_size == 10 * 1024 * 1024
    assert config.limits.idle_timeout == 300.0
    assert config.limits.max_hops == 25


def test_listeners_and_smarthost_forms():
    config = build_config({
        "listeners": [
            {"name": "mta", "address": "[::1]:2525"},
            {"name": "submission", "address": "0.0.0.0:587", "mode": "submission",
             "tls": {"cert": "/etc/mta/cert.pem", "key": "/etc/mta/key.pem"}},
            {"name": "smtps", "address": "0.0.0.0:465", "mode": "submission",
             "tls": {"cert": "c", "key": "k", "implicit": True}},
        ],
        "auth": {"users_file": "/etc/mta/users-that-need-not-exist"},
        "delivery": {"smarthost": {"address": "mail.example.net:587", "username": "u", "password": "p"}},
    })
    assert [(lc.name, lc.address, lc.mode) for lc in config.listeners] == [
        ("mta", "[::1]:2525", "relay"), ("submission", "0.0.0.0:587", "submission"),
        ("smtps", "0.0.0.0:465", "submission")]
    assert config.listeners[1].tls == TLSConfig(cert="/etc/mta/cert.pem", key="/etc/mta/key.pem",
                                                implicit=False)
    assert config.listeners[2].tls == TLSConfig(cert="c", key="k", implicit=True)
    assert config.delivery.smarthost == SmarthostConfig("mail.example.net", 587, "u", "p")
    assert build_config({"delivery": {"smarthost": "relay.example.net"}}).delivery.smarthost == \
        SmarthostConfig("relay.example.net", 25)
    assert build_config({"delivery": {"smarthost": "[2001:db8::25]:2525"}}).delivery.smarthost == \
        SmarthostConfig("2001:db8::25", 2525)


@pytest.mark.parametrize("off", [None, False, "off", "none"])
def test_metrics_can_be_turned_off(off):
    metrics = build_config({"metrics": {"address": off}}).metrics
    assert metrics.host is None


@pytest.mark.parametrize("mode", ["may", "encrypt", "none"])
def test_delivery_tls_modes(mode):
    assert build_config({"delivery": {"tls": mode}}).delivery.tls == mode


# --------------------------------------------------------------------------- errors name the key path

SUBMISSION = {"name": "sub", "address": "127.0.0.1:587", "mode": "submission"}


@pytest.mark.parametrize(("data", "message"), [
    # unknown keys, at every level
    ({"hostnmae": "x"}, "hostnmae: unknown key"),
    ({"delivery": {"retry": {"foo": 1}}}, "delivery.retry.foo: unknown key"),
    ({"delivery": {"smarthosts": "a:25"}}, "delivery.smarthosts: unknown key"),
    ({"delivery": {"dns": {"server": "192.0.2.53"}}}, "delivery.dns.server: unknown key"),
    ({"delivery": {"smarthost": {"address": "a:25", "user": "u"}}}, "delivery.smarthost.user: unknown key"),
    ({"limits": {"max_size": 10}}, "limits.max_size: unknown key"),
    ({"listeners": [{"name": "mta", "address": "127.0.0.1:25", "port": 25}]},
     "listeners[0].port: unknown key"),
    ({"listeners": [{"name": "mta", "address": "127.0.0.1:25", "tls": {"cert": "c", "key": "k", "ca": "x"}}]},
     "listeners[0].tls.ca: unknown key"),
    # wrong types
    ({"limits": 5}, "limits: 5 is not a mapping"),
    ({"delivery": {"retry": ["5m"]}}, "delivery.retry: ['5m'] is not a mapping"),
    ({"listeners": "127.0.0.1:25"}, 'listeners: "127.0.0.1:25" is not a list'),
    ({"listeners": ["127.0.0.1:25"]}, 'listeners[0]: "127.0.0.1:25" is not a mapping'),
    ({"mynetworks": "127.0.0.0/8"}, 'mynetworks: "127.0.0.0/8" is not a list'),
    ({"limits": {"max_recipients": "100"}}, 'limits.max_recipients: "100" is not an integer'),
    ({"limits": {"max_hops": True}}, "limits.max_hops: True is not an integer"),
    ({"limits": {"max_hops": 0}}, "limits.max_hops: 0 is below the minimum of 1"),
    ({"delivery": {"concurrency": 2.5}}, "delivery.concurrency: 2.5 is not an integer"),
    ({"delivery": {"port": 70000}}, "delivery.port: 70000 is not a port (1-65535)"),
    ({"listeners": [{"name": "mta", "address": "127.0.0.1:25", "allow_insecure_auth": "yes"}]},
     'listeners[0].allow_insecure_auth: "yes" is not true or false'),
    ({"queue": {"path": 5}}, "queue.path: 5 is not a string"),
    ({"queue": {"path": None}}, "queue.path: None is not a string"),
    ({"hostname": "bad_host!"}, 'hostname: "bad_host!" is not a host name'),
    ({"relay_domains": ["lab.test", "bad domain"]}, 'relay_domains[1]: "bad domain" is not a domain name'),
    # durations and sizes
    ({"delivery": {"retry": {"min_backoff": "5x"}}}, 'delivery.retry.min_backoff: "5x" is not a duration'),
    ({"delivery": {"retry": {"delay_warning": "soon"}}},
     'delivery.retry.delay_warning: "soon" is not a duration'),
    ({"delivery": {"retry": {"min_backoff": "2h", "max_backoff": "1h"}}},
     "delivery.retry.max_backoff: is smaller than min_backoff"),
    ({"limits": {"idle_timeout": "5 min"}}, 'limits.idle_timeout: "5 min" is not a duration'),
    ({"limits": {"message_size": "10XB"}}, 'limits.message_size: "10XB" is not a size'),
    ({"limits": {"message_size": "ten megs"}}, 'limits.message_size: "ten megs" is not a size'),
    # addresses
    ({"listeners": [{"name": "mta", "address": "localhost"}]},
     'listeners[0].address: "localhost" is not an address (want host:port)'),
    ({"listeners": [{"name": "mta", "address": "127.0.0.1:0"}]},
     'listeners[0].address: "127.0.0.1:0" has a port outside 1-65535'),
    ({"listeners": [{"name": "mta"}]}, "listeners[0].address: missing"),
    ({"listeners": [{"address": "127.0.0.1:25"}]}, "listeners[0].name: missing"),
    ({"delivery": {"smarthost": "::1:25"}},
     'delivery.smarthost: "::1:25" is not an address (want host:port)'),
    ({"delivery": {"smarthost": {"username": "u"}}}, "delivery.smarthost.address: missing"),
    ({"delivery": {"routes": {"lab.test": "sink.lab.test:99999"}}},
     'delivery.routes.lab.test: "sink.lab.test:99999" has a port outside 1-65535'),
    ({"delivery": {"routes": ["lab.test"]}},
     "delivery.routes: ['lab.test'] is not a mapping of domain to host:port"),
    ({"delivery": {"dns": {"nameservers": ["192.0.2.53", "ns1.lab.test"]}}},
     'delivery.dns.nameservers[1]: "ns1.lab.test" is not an IP address'),
    ({"metrics": {"address": "9101"}}, 'metrics.address: "9101" is not an address (want host:port)'),
    # networks
    ({"mynetworks": ["127.0.0.0/8", "10.0.0.0/33"]}, 'mynetworks[1]: "10.0.0.0/33" is not a CIDR network'),
    ({"mynetworks": ["lab.test"]}, 'mynetworks[0]: "lab.test" is not a CIDR network'),
    # listener modes and names
    ({"listeners": [{"name": "mta", "address": "127.0.0.1:25", "mode": "smtp"}]},
     'listeners[0].mode: "smtp" is not one of relay, submission, pop3, http'),
    ({"listeners": [{"name": "mta", "address": "127.0.0.1:25"}, {"name": "mta", "address": "127.0.0.1:26"}]},
     'listeners[1].name: "mta" is used twice'),
    ({"listeners": []}, "listeners: at least one listener is needed"),
    ({"listeners": [{"name": "mta", "address": "127.0.0.1:25", "tls": {"cert": "c"}}]},
     "listeners[0].tls.key: missing"),
    ({"listeners": [SUBMISSION]}, "auth.users_file: missing (a submission listener needs credentials)"),
    ({"delivery": {"tls": "must"}}, 'delivery.tls: "must" is not one of may, encrypt, none'),
    # the shared database (issue 16)
    ({"queue": {"backend": "postgres"}}, 'queue.backend: "postgres" is not one of sqlite, postgresql'),
    ({"queue": {"backend": "postgresql"}}, "queue.dsn: missing (backend postgresql needs the database's URI)"),
    ({"queue": {"dsn": "postgresql://mta@db/mta"}}, "queue.dsn: only used with backend: postgresql"),
    ({"queue": {"backend": "postgresql", "dsn": "mysql://mta:secret@db/mta"}},
     'queue.dsn: "mysql://mta:***@db/mta" is not a PostgreSQL URI (postgresql://user@host:port/database)'),
    ({"queue": {"backend": "postgresql", "dsn": "host=db dbname=mta"}},
     'queue.dsn: "host=db dbname=mta" is not a PostgreSQL URI (postgresql://user@host:port/database)'),
    ({"queue": {"backend": "postgresql", "dsn": "postgresql://db:70000/mta"}},
     'queue.dsn: "postgresql://db:70000/mta" has a port outside 1-65535 (70000)'),
    ({"queue": {"backend": "postgresql", "dsn": "postgresql://db1:5432,db2:x/mta"}},
     'queue.dsn: "postgresql://db1:5432,db2:x/mta" has a port outside 1-65535 (x)'),
    ({"queue": {"backend": "postgresql", "dsn": "postgresql://db/mta", "lease": "1s"}},
     "queue.lease: 1s is too short (at least 3s: a node renews its leases every third of it)"),
    ({"queue": {"backend": "postgresql", "dsn": "postgresql://db/mta", "lease": "soon"}},
     'queue.lease: "soon" is not a duration'),
])
def test_errors_name_the_key_path(data, message):
    assert error_of(data) == message


def test_postgresql_queue_settings():
    config = build_config({"queue": {"backend": "postgresql", "dsn": "postgresql://mta:secret@db.lab.example:5433/mta",
                                     "lease": "30s"}})
    assert (config.queue.backend, config.queue.dsn, config.queue.lease) == \
        ("postgresql", "postgresql://mta:secret@db.lab.example:5433/mta", 30.0)
    # Log lines and the inbox's info name the database without its password.
    assert config.queue.location == "postgresql://mta:***@db.lab.example:5433/mta"
    # A primary and its standby: libpq's multi-host form, the writable one chosen at connect.
    both = "postgresql://mta@db1.lab.example:5432,[2001:db8::2]:5432/mta?target_session_attrs=read-write"
    assert build_config({"queue": {"backend": "postgresql", "dsn": both}}).queue.dsn == both
    default = build_config({})
    assert (default.queue.backend, default.queue.dsn, default.queue.lease) == ("sqlite", None, 60.0)
    assert default.queue.location == default.queue.path


def test_submission_listener_needs_only_the_users_file_setting():
    # Loading never checks that files exist; `serve` does when it starts.
    config = build_config({"listeners": [SUBMISSION], "auth": {"users_file": "/nonexistent/users"}})
    assert config.listeners[0].mode == "submission"
    assert config.auth.users_file == "/nonexistent/users"


def test_load_config_file_errors(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(missing)
    assert str(info.value) == f"{missing}: No such file or directory"
    broken = tmp_path / "broken.yaml"
    broken.write_text("limits:\n  max_hops: 5\n  bad: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(broken)
    assert str(info.value) == f"{broken}: not valid YAML at line 4"


def run_check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mta_command("check-config", "--config", str(path)), capture_output=True,
                          text=True, timeout=30, env=subprocess_env())


def test_check_config_prints_the_key_path_and_exits_2(tmp_path):
    path = tmp_path / "mta.yaml"
    path.write_text("delivery:\n  retry:\n    min_backoff: 5x\n")
    result = run_check_config(path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == 'config: delivery.retry.min_backoff: "5x" is not a duration\n'


def test_check_config_unknown_nested_key(tmp_path):
    path = tmp_path / "mta.yaml"
    path.write_text("delivery:\n  retry:\n    foo: 1\n")
    result = run_check_config(path)
    assert (result.returncode, result.stderr) == (2, "config: delivery.retry.foo: unknown key\n")


# --------------------------------------------------------------------------- the reference file

def test_reference_file_passes_check_config():
    result = run_check_config(REFERENCE)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"config: {REFERENCE}: ok\n"
    assert result.stderr == ""


def test_reference_file_is_the_defaults(monkeypatch):
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    loaded = load_config(REFERENCE)
    assert dataclasses.replace(loaded, source="<built-in defaults>") == build_config({})


# The reference file's sections whose keys are the fields of a config class.
REFERENCE_SECTIONS = {
    "": Config, "mailboxes": MailboxesConfig, "auth": AuthConfig, "delivery": DeliveryConfig,
    "delivery.dns": DNSConfig, "delivery.connection_cache": ConnectionCacheConfig,
    "delivery.retry": RetryConfig, "delivery.timeouts": TimeoutsConfig, "limits": LimitsConfig,
    "bounce": BounceConfig, "dsn": DSNConfig,
}
NOT_KEYS = {"source"}
LEFT_TO_THE_MACHINE = {"hostname"}   # commented out: the FQDN applies (and queue.path: $STATE_DIRECTORY)


@pytest.mark.parametrize("path", REFERENCE_SECTIONS)
def test_reference_file_writes_out_every_key(path):
    """Every key of these sections is written in config/mta.yaml, so the file shows each
    setting with its default (test_reference_file_is_the_defaults: the code's default)."""
    section = yaml.safe_load(REFERENCE.read_text())
    for name in filter(None, path.split(".")):
        section = section[name]
    fields = {spec.name for spec in dataclasses.fields(REFERENCE_SECTIONS[path])}
    assert set(section) == fields - NOT_KEYS - LEFT_TO_THE_MACHINE


def test_reference_file_leaves_hostname_and_queue_path_to_the_machine(monkeypatch):
    # hostname and queue.path are commented out, so the FQDN and $STATE_DIRECTORY still apply.
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/mta")
    monkeypatch.setattr("mta.config.socket.getfqdn", lambda: "relay7.lab.test")
    loaded = load_config(REFERENCE)
    assert loaded.queue.path == "/var/lib/mta/queue.db"
    assert loaded.hostname == "relay7.lab.test"


def test_reference_file_sets_every_key():
    """Every key the loader reads appears in the file, set or as a commented example."""
    text = REFERENCE.read_text()
    keys = set(re.findall(r"^[ #-]*([a-z_]+):", text, flags=re.M))
    for key in [
        "hostname", "listeners", "name", "address", "mode", "allow_insecure_auth", "tls", "cert", "key",
        "implicit", "mynetworks", "relay_domains", "auth", "users_file", "queue", "path", "delivery",
        "smarthost", "username", "password", "port", "routes", "concurrency", "per_destination_concurrency",
        "dns", "nameservers", "timeout", "connection_cache", "max_messages", "idle_timeout", "retry",
        "min_backoff", "max_backoff", "max_lifetime", "delay_warning", "timeouts", "connect", "command",
        "limits", "message_size", "max_recipients", "max_connections", "max_connections_per_ip", "max_hops",
        "metrics",
    ]:
        assert key in keys, key
    postfix_notes = " ".join(re.findall(r"\(Postfix: ([^)]*)\)", text))
    for postfix in ["mynetworks", "relay_domains", "relayhost", "transport_maps", "message_size_limit",
                    "minimal_backoff_time", "maximal_backoff_time", "maximal_queue_lifetime",
                    "hopcount_limit",
                    "smtpd_client_connection_count_limit", "smtp_connection_cache_"]:
        assert postfix in postfix_notes, postfix


def commented_example(first: str) -> object:
    """Parse the commented-out YAML block in the reference file that starts with ``first``.

    The block runs on while the following comment lines are indented deeper than its first line.
    """
    found: list[str] = []
    column = -1
    for line in REFERENCE.read_text().splitlines():
        m = re.fullmatch(r"(\s*#\s*)(.*)", line)
        if column < 0:
            if m and m.group(2) == first:
                column = len(m.group(1))
                found.append(line[column:])
            continue
        if not m or not m.group(2) or len(m.group(1)) <= column:
            break
        found.append(line[column:])
    assert found, f"no commented example {first!r} in {REFERENCE}"
    return yaml.safe_load("\n".join(found))


def test_reference_file_examples_load():
    """The commented-out examples are valid when uncommented."""
    data = yaml.safe_load(REFERENCE.read_text())
    data.update(commented_example("hostname: relay.lab.example"))
    data["listeners"] += commented_example("- name: submission")
    data["queue"] = commented_example("path: var/queue.db")
    data["auth"]["users_file"] = "/etc/mta/users"
    data["delivery"].update(commented_example("routes:"))
    data["delivery"]["retry"]["delay_warning"] = "4h"
    config = build_config(data)
    assert config.hostname == "relay.lab.example"
    assert config.queue.path == "var/queue.db"
    assert [(lc.name, lc.address, lc.mode) for lc in config.listeners] == [
        ("mta", "127.0.0.1:2525", "relay"), ("submission", "[::]:587", "submission")]
    assert config.listeners[1].tls == TLSConfig("/etc/mta/tls/fullchain.pem", "/etc/mta/tls/privkey.pem",
                                                False)
    assert config.delivery.routes == (
        ("lab.example", "mailhog.lab.example", 1025), ("test.example", "192.0.2.10", 25))
    assert config.delivery.retry.delay_warning == 4 * 3600

    data["delivery"].update(commented_example("smarthost: mail.example.net:587"))
    assert build_config(data).delivery.smarthost == SmarthostConfig("mail.example.net", 587)
    data["delivery"].update(commented_example("smarthost:"))
    assert build_config(data).delivery.smarthost == SmarthostConfig(
        "mail.example.net", 587, "relay-user", "secret")


# --------------------------------------------------------------------------- lookups

def net_config(*nets: str) -> Config:
    return build_config({"mynetworks": list(nets)})


@pytest.mark.parametrize(("ip", "inside"), [
    ("192.0.2.7", True), ("192.0.2.255", True), ("192.0.3.1", False),
    ("10.1.2.3", True), ("10.255.255.255", True), ("11.0.0.1", False),
    ("2001:db8::1", True), ("2001:db8:ffff::1", True), ("2001:db9::1", False),
    ("fe80::1%eth0", True),                # scope id is ignored
    ("::ffff:192.0.2.7", True),            # v4-mapped v6 matches the IPv4 entry
    ("::ffff:192.0.3.1", False),
    ("::ffff:10.0.0.1", True),
    ("::1", False), ("127.0.0.1", False),  # an explicit mynetworks replaces the default
    ("not-an-ip", False), ("", False),
])
def test_in_mynetworks(ip, inside):
    config = net_config("192.0.2.0/24", "10.0.0.0/8", "2001:db8::/32", "fe80::/10")
    assert config.in_mynetworks(ip) is inside


def test_default_mynetworks_is_loopback():
    config = build_config({})
    assert config.in_mynetworks("127.0.0.1")
    assert config.in_mynetworks("127.8.9.10")
    assert config.in_mynetworks("::1")
    assert config.in_mynetworks("::ffff:127.0.0.1")
    assert not config.in_mynetworks("192.0.2.1")
    assert not config.in_mynetworks("::2")


def test_mynetworks_host_bits_are_allowed():
    # Postfix accepts "10.1.2.3/8" as 10.0.0.0/8; so does mta.
    config = net_config("10.1.2.3/8", "192.0.2.1")
    assert config.mynetworks == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.1/32"))
    assert config.in_mynetworks("10.200.0.1")
    assert not config.in_mynetworks("192.0.2.2")


def test_routes_lookup():
    delivery = build_config({"delivery": {"routes": {
        "Lab.Test": "sink.lab.test:2525",
        "other.test.": "[192.0.2.10]",
        "v6.test": "[2001:db8::25]:26",
    }}}).delivery
    assert delivery.routes == (("lab.test", "sink.lab.test", 2525), ("other.test", "192.0.2.10", 25),
                               ("v6.test", "2001:db8::25", 26))
    assert delivery.route_for("lab.test") == ("sink.lab.test", 2525)
    assert delivery.route_for("LAB.TEST") == ("sink.lab.test", 2525)
    assert delivery.route_for("other.test") == ("192.0.2.10", 25)
    assert delivery.route_for("v6.test") == ("2001:db8::25", 26)
    assert delivery.route_for("sub.lab.test") is None   # exact domains only
    assert delivery.route_for("elsewhere.test") is None


def test_relay_domains_lookup():
    config = build_config({"relay_domains": ["Lab.Test", "other.test."]})
    assert config.relay_domains == ("lab.test", "other.test")
    assert config.is_relay_domain("LAB.test")
    assert config.is_relay_domain("other.test.")
    assert not config.is_relay_domain("sub.lab.test")


def test_postfix_style_bracketed_relayhost_is_accepted():
    from mta.config import build_config
    config = build_config({"delivery": {"smarthost": "[mail.example.net]:587"}})
    assert (config.delivery.smarthost.host, config.delivery.smarthost.port) == ("mail.example.net", 587)


def test_routes_ignore_a_trailing_dot():
    from mta.config import build_config
    config = build_config({"delivery": {"routes": {"example.test": "127.0.0.5:2526"}}})
    assert config.delivery.route_for("Example.Test.") == ("127.0.0.5", 2526)


@pytest.mark.parametrize("fqdn, kernel, expected", [
    ("relay.lab.example", "relay", "relay.lab.example"),
    ("localhost", "relay", "relay"),                       # /etc/hosts: 127.0.0.1 localhost relay
    ("localhost.localdomain", "relay", "relay"),
    ("localhost", "localhost", "localhost"),               # nothing better to be had
    ("not a host name", "relay", "relay"),
])
def test_default_hostname_is_never_localhost_because_getfqdn_said_so(monkeypatch, fqdn, kernel, expected):
    import socket

    from mta.config import default_hostname
    monkeypatch.setattr(socket, "getfqdn", lambda: fqdn)
    monkeypatch.setattr(socket, "gethostname", lambda: kernel)
    assert default_hostname() == expected

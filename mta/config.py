"""Configuration: one YAML file turned into frozen dataclasses.

The key names are the public interface (operators' files depend on them).
Every problem is reported as a ConfigError whose text names the key path,
e.g. ``delivery.retry.min_backoff: "5x" is not a duration``.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import ssl
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, TypeVar

import yaml

from mta.errors import ConfigError

T = TypeVar("T")

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
LISTENER_MODES = ("relay", "submission", "pop3")
DELIVERY_TLS_MODES = ("may", "encrypt", "none")


# --------------------------------------------------------------------------- value parsers

def parse_duration(value: Any, path: str) -> float:
    """'30s', '5m', '2h', '5d', '1w', '250ms' or a plain number of seconds."""
    if isinstance(value, bool):
        raise ConfigError(path, f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(path, f"{value!r} is not a duration (negative)")
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*", value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]
    raise ConfigError(path, f"{_show(value)} is not a duration")


def parse_size(value: Any, path: str) -> int:
    """Bytes as an integer, or '10MB' (decimal: KB, MB, GB) / '10MiB' (binary)."""
    if isinstance(value, bool):
        raise ConfigError(path, f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(path, f"{value!r} is not a size (negative)")
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ConfigError(path, f"{_show(value)} is not a size")


def parse_hostport(value: Any, path: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port', '[::1]:port' (or 'host' when a default port applies)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"{_show(value)} is not an address (want host:port)")
    text = value.strip()
    # "[host]:port" as in Postfix's relayhost, and the only way to write an IPv6 literal.
    m = re.fullmatch(r"\[([0-9A-Za-z:._-]+)\](?::(\d+))?", text) or re.fullmatch(
        r"([^:\[\]\s]+)(?::(\d+))?", text
    )
    if not m or (m.group(2) is None and default_port is None):
        raise ConfigError(path, f"{_show(value)} is not an address (want host:port)")
    host = m.group(1)
    port = int(m.group(2)) if m.group(2) is not None else int(default_port or 0)
    if not 0 < port < 65536:
        raise ConfigError(path, f"{_show(value)} has a port outside 1-65535")
    return host, port


def _show(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)


# --------------------------------------------------------------------------- dataclasses

# TLS 1.2 suites with forward secrecy and AEAD only (TLS 1.3's are all AEAD): no CBC
# suites, which TLS scanners flag (LUCKY13), and no RSA key exchange.
DEFAULT_TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")


@dataclass(frozen=True, slots=True)
class TLSConfig:
    cert: str
    key: str
    implicit: bool = False
    # Postfix: smtpd_tls_mandatory_protocols / smtpd_tls_mandatory_ciphers.
    min_version: str = "TLSv1.2"
    ciphers: str = DEFAULT_TLS_CIPHERS   # OpenSSL cipher list for TLS 1.2


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    name: str
    host: str
    port: int
    mode: str = "relay"
    tls: TLSConfig | None = None
    allow_insecure_auth: bool = False

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AuthConfig:
    users_file: str | None = None


@dataclass(frozen=True, slots=True)
class QueueConfig:
    path: str = "var/queue.db"


@dataclass(frozen=True, slots=True)
class DNSConfig:
    nameservers: tuple[str, ...] = ()
    port: int = 53
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class ConnectionCacheConfig:
    max_messages: int = 100
    idle_timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class RetryConfig:
    min_backoff: float = 300.0
    max_backoff: float = 3600.0
    max_lifetime: float = 5 * 86400.0
    delay_warning: float | None = None


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    connect: float = 30.0
    command: float = 300.0


@dataclass(frozen=True, slots=True)
class SmarthostConfig:
    host: str
    port: int
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    smarthost: SmarthostConfig | None = None
    port: int = 25
    dns: DNSConfig = field(default_factory=DNSConfig)
    concurrency: int = 20
    per_destination_concurrency: int = 5
    connection_cache: ConnectionCacheConfig = field(default_factory=ConnectionCacheConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    routes: tuple[tuple[str, str, int], ...] = ()  # (domain, host, port)
    tls: str = "may"

    def route_for(self, domain: str) -> tuple[str, int] | None:
        domain = domain.lower().rstrip(".")
        for name, host, port in self.routes:
            if name == domain:
                return host, port
        return None


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    message_size: int = 10_000_000
    max_recipients: int = 100
    max_connections: int = 200
    max_connections_per_ip: int = 20
    idle_timeout: float = 300.0
    max_hops: int = 50
    hard_error_limit: int = 20     # Postfix: smtpd_hard_error_limit
    junk_command_limit: int = 100  # Postfix: smtpd_junk_command_limit


@dataclass(frozen=True, slots=True)
class BounceConfig:
    double_bounce_to: str | None = None   # Postfix: 2bounce_notice_recipient (there: postmaster)


@dataclass(frozen=True, slots=True)
class MailboxesConfig:
    """Mailboxes for local_domains (issue 7): who has one, and how much is kept."""

    users_file: str | None = None
    max_messages: int = 10_000
    max_age: float = 7 * 86400.0
    catch_all: bool = False


@dataclass(frozen=True, slots=True)
class DSNConfig:
    """RFC 3461 delivery status notifications offered to SMTP clients."""

    # Offer and honour NOTIFY/RET/ENVID/ORCPT for clients neither in mynetworks nor
    # authenticated (Postfix's default). False is Postfix's smtpd_discard_ehlo_keywords =
    # dsn for them: NOTIFY=SUCCESS with RET=FULL lets anyone have a full copy of a
    # message sent to an address of their choice from this relay.
    offer_to_untrusted: bool = True


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    host: str | None = "127.0.0.1"
    port: int = 9101


@dataclass(frozen=True, slots=True)
class Config:
    hostname: str
    listeners: tuple[ListenerConfig, ...]
    mynetworks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    relay_domains: tuple[str, ...]
    auth: AuthConfig
    queue: QueueConfig
    delivery: DeliveryConfig
    limits: LimitsConfig
    metrics: MetricsConfig
    bounce: BounceConfig = field(default_factory=BounceConfig)
    local_domains: tuple[str, ...] = ()
    mailboxes: MailboxesConfig = field(default_factory=MailboxesConfig)
    # Postfix's mydestination for the relay host itself: every address at these
    # domains is kept in a mailbox here, no users file needed (cron's root@$(hostname)).
    mydestination: tuple[str, ...] = ()
    # Where mail to Postmaster goes (RFC 5321 §4.5.1; Postfix: the postmaster alias).
    postmaster: str = ""
    dsn: DSNConfig = field(default_factory=DSNConfig)
    source: str = "<built-in defaults>"

    def in_mynetworks(self, ip: str) -> bool:
        return _in_networks(ip, self.mynetworks)

    def is_relay_domain(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        return domain in self.relay_domains

    def is_local_domain(self, domain: str) -> bool:
        """Mail for these domains goes into mailboxes here (Postfix: mydestination)."""
        return domain.lower().rstrip(".") in self.local_domains

    def postmaster_for(self, address: str) -> str | None:
        """The postmaster address that mail to ``address`` goes to, if it is a postmaster
        address: <Postmaster> without a domain, or postmaster@ a local domain, a
        mydestination domain or our hostname, in any case (RFC 5321 §4.5.1: always accepted)."""
        local, at, domain = address.rpartition("@")
        if not at:
            local, domain = address, self.hostname
        if local.lower() != "postmaster":
            return None
        domain = domain.lower().rstrip(".")
        if domain == self.hostname.lower() or domain in self.local_domains or domain in self.mydestination:
            return self.postmaster
        return None


@functools.lru_cache(maxsize=4096)
def _in_networks(ip: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    """Cached: asked at every RCPT, and a lab relay sees few distinct client IPs."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        addr = addr.ipv4_mapped
    return any(addr in net for net in networks if net.version == addr.version)


# --------------------------------------------------------------------------- loading

class _Section:
    """A mapping being read: remembers its key path and rejects unknown keys."""

    def __init__(self, data: Any, path: str):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(path or "(top level)", f"{_show(data)} is not a mapping")
        self.data = data
        self.path = path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, default: T, convert: Callable[[Any, str], T]) -> T:
        self.used.add(name)
        if name not in self.data or self.data[name] is None and default is None:
            return default
        return convert(self.data[name], self.key(name))

    def section(self, name: str) -> "_Section":
        self.used.add(name)
        return _Section(self.data.get(name), self.key(name))

    def done(self) -> None:
        for name in self.data:
            if name not in self.used:
                raise ConfigError(self.key(str(name)), "unknown key")


def _int(minimum: int = 0) -> Callable[[Any, str], int]:
    def convert(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"{_show(value)} is not an integer")
        if value < minimum:
            raise ConfigError(path, f"{value} is below the minimum of {minimum}")
        return value
    return convert


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"{_show(value)} is not true or false")
    return value


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"{_show(value)} is not a string")
    return value


def _port(value: Any, path: str) -> int:
    port = _int(1)(value, path)
    if port > 65535:
        raise ConfigError(path, f"{port} is not a port (1-65535)")
    return port


def _list(item: Callable[[Any, str], T]) -> Callable[[Any, str], tuple[T, ...]]:
    def convert(value: Any, path: str) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise ConfigError(path, f"{_show(value)} is not a list")
        return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))
    return convert


def _network(value: Any, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ConfigError(path, f"{_show(value)} is not a CIDR network") from None


def _domain(value: Any, path: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+\.?", value) or value.startswith("."):
        raise ConfigError(path, f"{_show(value)} is not a domain name")
    return value.lower().rstrip(".")


def _hostname(value: Any, path: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", value):
        raise ConfigError(path, f"{_show(value)} is not a host name")
    return value


def _optional_path(value: Any, path: str) -> str:
    return _str(value, path)


def default_hostname() -> str:
    """The FQDN, else the kernel's host name (Postfix's myhostname default); never
    "localhost", which getfqdn() answers when /etc/hosts maps the name to 127.0.0.1
    as "localhost" first: our Received: lines and greeting would all say localhost."""
    for name in (socket.getfqdn(), socket.gethostname()):
        if re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", name) and \
                not name.lower().startswith("localhost"):
            return name
    return "localhost"


def default_queue_path() -> str:
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        # systemd may pass several directories separated by ':'; the first is ours.
        return str(Path(state.split(":")[0]) / "queue.db")
    return "var/queue.db"


def _listener(value: Any, path: str) -> ListenerConfig:
    sec = _Section(value, path)
    name = sec.get("name", None, _str)
    if name is None:
        raise ConfigError(sec.key("name"), "missing")
    address = sec.get("address", None, parse_hostport)
    if address is None:
        raise ConfigError(sec.key("address"), "missing")
    mode = sec.get("mode", "relay", _str)
    if mode not in LISTENER_MODES:
        raise ConfigError(sec.key("mode"), f"{_show(mode)} is not one of {', '.join(LISTENER_MODES)}")
    tls = None
    if sec.data.get("tls") is not None:
        tsec = sec.section("tls")
        cert = tsec.get("cert", None, _str)
        key = tsec.get("key", None, _str)
        if cert is None or key is None:
            raise ConfigError(tsec.key("cert" if cert is None else "key"), "missing")
        min_version = tsec.get("min_version", "TLSv1.2", _str)
        if min_version not in TLS_VERSIONS:
            raise ConfigError(tsec.key("min_version"), f"{_show(min_version)} is not one of {', '.join(TLS_VERSIONS)}")
        ciphers = tsec.get("ciphers", DEFAULT_TLS_CIPHERS, _str)
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
        except ssl.SSLError:
            raise ConfigError(tsec.key("ciphers"), f"{_show(ciphers)} selects no cipher OpenSSL knows") from None
        tls = TLSConfig(cert=cert, key=key, implicit=tsec.get("implicit", False, _bool),
                        min_version=min_version, ciphers=ciphers)
        tsec.done()
    else:
        sec.used.add("tls")
    insecure = sec.get("allow_insecure_auth", False, _bool)
    sec.done()
    return ListenerConfig(name=name, host=address[0], port=address[1], mode=mode, tls=tls,
                          allow_insecure_auth=insecure)


def _routes(value: Any, path: str) -> tuple[tuple[str, str, int], ...]:
    if not isinstance(value, dict):
        raise ConfigError(path, f"{_show(value)} is not a mapping of domain to host:port")
    out = []
    for domain, target in value.items():
        d = _domain(domain, f"{path}.{domain}")
        host, port = parse_hostport(target, f"{path}.{domain}", default_port=25)
        out.append((d, host, port))
    return tuple(out)


def _smarthost(value: Any, path: str) -> SmarthostConfig:
    if isinstance(value, str):
        host, port = parse_hostport(value, path, default_port=25)
        return SmarthostConfig(host, port)
    sec = _Section(value, path)
    address = sec.get("address", None, lambda v, p: parse_hostport(v, p, default_port=25))
    if address is None:
        raise ConfigError(sec.key("address"), "missing")
    cfg = SmarthostConfig(address[0], address[1], sec.get("username", None, _str),
                          sec.get("password", None, _str))
    sec.done()
    return cfg


def _delivery(sec: _Section) -> DeliveryConfig:
    dns = sec.section("dns")
    dns_cfg = DNSConfig(
        nameservers=dns.get("nameservers", (), _list(_ip_text)),
        port=dns.get("port", 53, _port),
        timeout=dns.get("timeout", 5.0, parse_duration),
    )
    dns.done()
    cc = sec.section("connection_cache")
    cc_cfg = ConnectionCacheConfig(
        max_messages=cc.get("max_messages", 100, _int(1)),
        idle_timeout=cc.get("idle_timeout", 2.0, parse_duration),
    )
    cc.done()
    retry = sec.section("retry")
    retry_cfg = RetryConfig(
        min_backoff=retry.get("min_backoff", 300.0, parse_duration),
        max_backoff=retry.get("max_backoff", 3600.0, parse_duration),
        max_lifetime=retry.get("max_lifetime", 5 * 86400.0, parse_duration),
        delay_warning=retry.get("delay_warning", None, parse_duration),
    )
    if retry_cfg.max_backoff < retry_cfg.min_backoff:
        raise ConfigError(retry.key("max_backoff"), "is smaller than min_backoff")
    retry.done()
    timeouts = sec.section("timeouts")
    timeouts_cfg = TimeoutsConfig(
        connect=timeouts.get("connect", 30.0, parse_duration),
        command=timeouts.get("command", 300.0, parse_duration),
    )
    timeouts.done()
    tls = sec.get("tls", "may", _str)
    if tls not in DELIVERY_TLS_MODES:
        raise ConfigError(sec.key("tls"), f"{_show(tls)} is not one of {', '.join(DELIVERY_TLS_MODES)}")
    cfg = DeliveryConfig(
        smarthost=sec.get("smarthost", None, _smarthost),
        port=sec.get("port", 25, _port),
        dns=dns_cfg,
        concurrency=sec.get("concurrency", 20, _int(1)),
        per_destination_concurrency=sec.get("per_destination_concurrency", 5, _int(1)),
        connection_cache=cc_cfg,
        retry=retry_cfg,
        timeouts=timeouts_cfg,
        routes=sec.get("routes", (), _routes),
        tls=tls,
    )
    sec.done()
    return cfg


def _ip_text(value: Any, path: str) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ConfigError(path, f"{_show(value)} is not an IP address") from None


DEFAULT_LISTENERS = (ListenerConfig(name="mta", host="127.0.0.1", port=2525, mode="relay"),)
DEFAULT_MYNETWORKS = ("127.0.0.0/8", "::1/128")


def build_config(data: Any, source: str = "<built-in defaults>") -> Config:
    """Validate a parsed YAML document and return the Config it describes."""
    top = _Section(data, "")
    hostname = top.get("hostname", None, _hostname) or default_hostname()
    listeners = top.get("listeners", DEFAULT_LISTENERS, _list(_listener))
    if not listeners:
        raise ConfigError("listeners", "at least one listener is needed")
    names = [item.name for item in listeners]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"listeners[{i}].name", f'"{name}" is used twice')
    for i, item in enumerate(listeners):
        _check_address_free(f"listeners[{i}].address", (item.host, item.port), listeners[:i])
    mynetworks = top.get("mynetworks", None, _list(_network))
    if mynetworks is None:
        mynetworks = tuple(ipaddress.ip_network(n) for n in DEFAULT_MYNETWORKS)
    relay_domains = top.get("relay_domains", (), _list(_domain))
    local_domains = top.get("local_domains", (), _list(_domain))
    for i, domain in enumerate(local_domains):
        if domain in relay_domains:
            raise ConfigError(f"local_domains[{i}]", f'"{domain}" is also in relay_domains (mail for it is either kept here or relayed)')
    mailboxes = _mailboxes(top.section("mailboxes"))
    if local_domains and not (mailboxes.users_file or mailboxes.catch_all):
        raise ConfigError("mailboxes.users_file", "missing (local_domains need mailbox users, or catch_all: true)")
    mydestination = tuple(hostname.lower() if d == "$myhostname" else d
                          for d in top.get("mydestination", (), _list(_destination)))
    for i, domain in enumerate(mydestination):
        if domain in relay_domains:
            raise ConfigError(f"mydestination[{i}]", f'"{domain}" is also in relay_domains (mail for it is either kept here or relayed)')
    postmaster = top.get("postmaster", None, _mailbox) or \
        f"postmaster@{local_domains[0] if local_domains else hostname.lower()}"
    if any(item.mode == "pop3" for item in listeners) and not mailboxes.users_file:
        raise ConfigError("mailboxes.users_file", "missing (a pop3 listener needs mailbox passwords)")
    auth = top.section("auth")
    auth_cfg = AuthConfig(users_file=auth.get("users_file", None, _optional_path))
    auth.done()
    if any(item.mode == "submission" for item in listeners) and not auth_cfg.users_file:
        raise ConfigError("auth.users_file", "missing (a submission listener needs credentials)")
    queue = top.section("queue")
    queue_cfg = QueueConfig(path=queue.get("path", default_queue_path(), _str))
    queue.done()
    delivery = _delivery(top.section("delivery"))
    lim = top.section("limits")
    limits = LimitsConfig(
        message_size=lim.get("message_size", 10_000_000, parse_size),
        max_recipients=lim.get("max_recipients", 100, _int(1)),
        max_connections=lim.get("max_connections", 200, _int(1)),
        max_connections_per_ip=lim.get("max_connections_per_ip", 20, _int(1)),
        idle_timeout=lim.get("idle_timeout", 300.0, parse_duration),
        max_hops=lim.get("max_hops", 50, _int(1)),
        hard_error_limit=lim.get("hard_error_limit", 20, _int(1)),
        junk_command_limit=lim.get("junk_command_limit", 100, _int(0)),
    )
    lim.done()
    bsec = top.section("bounce")
    bounce = BounceConfig(double_bounce_to=bsec.get("double_bounce_to", None, _mailbox))
    bsec.done()
    dsec = top.section("dsn")
    dsn = DSNConfig(offer_to_untrusted=dsec.get("offer_to_untrusted", True, _bool))
    dsec.done()
    met = top.section("metrics")
    address = met.get("address", ("127.0.0.1", 9101), _metrics_address)
    metrics = MetricsConfig(host=address[0] if address else None, port=address[1] if address else 0)
    if address:
        _check_address_free(met.key("address"), address, listeners)
    met.done()
    top.done()
    return Config(hostname=hostname, listeners=listeners, mynetworks=mynetworks,
                  relay_domains=relay_domains, auth=auth_cfg, queue=queue_cfg,
                  delivery=delivery, limits=limits, metrics=metrics, bounce=bounce,
                  local_domains=local_domains, mailboxes=mailboxes, dsn=dsn, mydestination=mydestination,
                  postmaster=postmaster, source=source)


def _check_address_free(path: str, address: tuple[str, int], taken: tuple[ListenerConfig, ...]) -> None:
    """Two sockets of ours on one address: the second bind would fail at start-up
    with a bare "Address already in use", as if some other program had the port."""
    host, port = address
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    mine = _host_key(host)
    for j, other in enumerate(taken):
        if other.port != port:
            continue
        theirs = _host_key(other.host)
        if mine == theirs:
            raise ConfigError(path, f'"{shown}" is already the address of listeners[{j}] ({other.name})')
        # 0.0.0.0 takes in every IPv4 address, :: every IPv6 one (asyncio binds
        # IPv6 sockets with IPV6_V6ONLY, so :: leaves IPv4 alone).
        if not isinstance(mine, str) and not isinstance(theirs, str) and mine.version == theirs.version \
                and (mine.is_unspecified or theirs.is_unspecified):
            raise ConfigError(path, f'"{shown}" overlaps listeners[{j}] ({other.name}) on {other.address}')


def _host_key(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | str:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return host.lower().rstrip(".")


def _mailboxes(sec: _Section) -> MailboxesConfig:
    cfg = MailboxesConfig(
        users_file=sec.get("users_file", None, _optional_path),
        max_messages=sec.get("max_messages", 10_000, _int(1)),
        max_age=sec.get("max_age", 7 * 86400.0, parse_duration),
        catch_all=sec.get("catch_all", False, _bool),
    )
    sec.done()
    return cfg


def _destination(value: Any, path: str) -> str:
    """A mydestination entry: a domain, or "$myhostname" (our hostname, as in Postfix)."""
    return value if value == "$myhostname" else _domain(value, path)


def _mailbox(value: Any, path: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[^@\s<>]+@[A-Za-z0-9_.-]+", value):
        raise ConfigError(path, f"{_show(value)} is not a mail address (user@domain)")
    return value


def _metrics_address(value: Any, path: str) -> tuple[str, int] | None:
    if value in (None, False, "off", "none"):
        return None
    return parse_hostport(value, path)


# Keys a SIGHUP does not change: the sockets, the queue file, the metrics server
# and the name we greet and sign bounces with stay as started.
RESTART_ONLY = ("listeners", "queue", "metrics", "hostname")


def reloaded(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The configuration a reload puts in force -- ``new`` with the RESTART_ONLY
    keys kept from ``old`` -- and the names of those that changed. The daemon and
    its delivery process both use it, so they never disagree after a SIGHUP."""
    changed = [name for name in RESTART_ONLY if getattr(new, name) != getattr(old, name)]
    if changed:
        new = replace(new, **{name: getattr(old, name) for name in RESTART_ONLY})
    return new, changed


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Load the YAML file at ``path``; None means the built-in defaults."""
    if path is None:
        return build_config({})
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), exc.strerror or str(exc)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(str(path), f"not valid YAML{where}") from None
    return build_config(data, source=str(path))

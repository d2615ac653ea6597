"""Configuration: one YAML file turned into frozen dataclasses.

This module says what the settings are and where they come from: the
dataclasses below (each field's default is the built-in default, written only
there), ``build_config`` (a parsed YAML document → Config, including the checks
that involve several keys) and ``load_config`` (a file → Config). How a single
value is written -- durations, sizes, host:port, domains, addresses -- is
mta/config_values.py.

The key names are the public interface (operators' files depend on them).
Every problem is reported as a ConfigError whose text names the key path,
e.g. ``delivery.retry.min_backoff: "5x" is not a duration``.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from mta.config_values import (
    HOST_NAME,
    Converter,
    Section,
    boolean,
    choice,
    cipher_list,
    domain_name,
    host_name,
    integer,
    ip_address_text,
    list_of,
    mail_address,
    network,
    parse_duration,
    parse_hostport,
    parse_size,
    port_number,
    postgresql_dsn,
    redacted_dsn,
    show,
    string,
)
from mta.errors import ConfigError

LISTENER_MODES = ("relay", "submission", "pop3", "http")
QUEUE_BACKENDS = ("sqlite", "postgresql")
# A node renews its leases every lease/3: shorter leases would mostly be renewals.
MIN_LEASE = 3.0
DELIVERY_TLS_MODES = ("may", "encrypt", "none")
SMTP_PORT = 25   # delivery.port, and the port of a route or smarthost written without one


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
    tls: TLSConfig | None = None             # http: HTTPS; pop3 and SMTP: STARTTLS/STLS or implicit TLS
    allow_insecure_auth: bool = False
    users_file: str | None = None            # http only: HTTP basic auth against these user:scrypt lines

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class AuthConfig:
    users_file: str | None = None


@dataclass(frozen=True, slots=True)
class QueueConfig:
    path: str = "var/queue.db"
    backend: str = "sqlite"          # sqlite (the file at path) | postgresql (the database at dsn)
    dsn: str | None = None           # libpq URI of the shared database (issue 16)
    lease: float = 60.0              # how long a node's claim on a recipient lasts unrenewed

    @property
    def location(self) -> str:
        """Where the queue is, fit for a log line: the file, or the database's URI
        without its password."""
        if self.backend == "postgresql" and self.dsn is not None:
            return redacted_dsn(self.dsn)
        return self.path


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
    port: int = SMTP_PORT
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
    # Fault injection (mta/inbound/chaos.py): true lets PUT /api/v1/chaos set triggers that
    # refuse MAIL, RCPT or AUTH now and then (Mailpit's --enable-chaos). Never in production.
    chaos: bool = False
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


# --------------------------------------------------------------------------- defaults

DEFAULT_LISTENERS = (ListenerConfig(name="mta", host="127.0.0.1", port=2525, mode="relay"),)
DEFAULT_MYNETWORKS = ("127.0.0.0/8", "::1/128")


def default_of(cls: type[Any], name: str) -> Any:
    """The built-in default of setting ``name``: the default of that field of dataclass
    ``cls``. The builders below ask for it, so each default is written once, in the class."""
    [spec] = [spec for spec in dataclasses.fields(cls) if spec.name == name]
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    raise TypeError(f"{cls.__name__}.{name} has no default")


def default_hostname() -> str:
    """The FQDN, else the kernel's host name (Postfix's myhostname default); never
    "localhost", which getfqdn() answers when /etc/hosts maps the name to 127.0.0.1
    as "localhost" first: our Received: lines and greeting would all say localhost."""
    for name in (socket.getfqdn(), socket.gethostname()):
        if HOST_NAME.fullmatch(name) and not name.lower().startswith("localhost"):
            return name
    return "localhost"


def default_queue_path() -> str:
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        # systemd may pass several directories separated by ':'; the first is ours.
        return str(Path(state.split(":")[0]) / "queue.db")
    path: str = default_of(QueueConfig, "path")
    return path


# --------------------------------------------------------------------------- loading

def _settings(sec: Section, cls: type[Any], **converters: Converter[Any]) -> dict[str, Any]:
    """The keys of ``sec`` named as fields of ``cls``, read in the order given (so the
    first mistake in a file is always the one reported); an absent key takes the field's default."""
    return {name: sec.get(name, default_of(cls, name), convert) for name, convert in converters.items()}


def _section(parent: Section, name: str, cls: type[Any], **converters: Converter[Any]) -> Any:
    """A section whose keys are exactly the fields of ``cls`` given in ``converters``."""
    sec = parent.section(name)
    cfg = cls(**_settings(sec, cls, **converters))
    sec.done()
    return cfg


def build_config(data: Any, source: str = "<built-in defaults>") -> Config:
    """Validate a parsed YAML document and return the Config it describes."""
    top = Section(data, "")
    hostname = top.get("hostname", None, host_name) or default_hostname()
    listeners = _listeners(top)
    mynetworks = top.get("mynetworks", None, list_of(network))
    if mynetworks is None:
        mynetworks = tuple(ipaddress.ip_network(n) for n in DEFAULT_MYNETWORKS)
    relay_domains = top.get("relay_domains", (), list_of(domain_name))
    local_domains = top.get("local_domains", default_of(Config, "local_domains"), list_of(domain_name))
    _check_not_relayed("local_domains", local_domains, relay_domains)
    mailboxes: MailboxesConfig = _section(top, "mailboxes", MailboxesConfig, users_file=string,
                                          max_messages=integer(1), max_age=parse_duration, catch_all=boolean)
    if local_domains and not (mailboxes.users_file or mailboxes.catch_all):
        raise ConfigError("mailboxes.users_file", "missing (local_domains need mailbox users, or catch_all: true)")
    mydestination = tuple(hostname.lower() if d == "$myhostname" else d
                          for d in top.get("mydestination", default_of(Config, "mydestination"),
                                           list_of(_destination)))
    _check_not_relayed("mydestination", mydestination, relay_domains)
    postmaster = top.get("postmaster", None, mail_address) or \
        f"postmaster@{local_domains[0] if local_domains else hostname.lower()}"
    if any(item.mode == "pop3" for item in listeners) and not mailboxes.users_file:
        raise ConfigError("mailboxes.users_file", "missing (a pop3 listener needs mailbox passwords)")
    auth: AuthConfig = _section(top, "auth", AuthConfig, users_file=string)
    if any(item.mode == "submission" for item in listeners) and not auth.users_file:
        raise ConfigError("auth.users_file", "missing (a submission listener needs credentials)")
    queue_cfg = _queue(top.section("queue"))
    delivery = _delivery(top.section("delivery"))
    limits: LimitsConfig = _section(
        top, "limits", LimitsConfig, message_size=parse_size, max_recipients=integer(1),
        max_connections=integer(1), max_connections_per_ip=integer(1), idle_timeout=parse_duration,
        max_hops=integer(1), hard_error_limit=integer(1), junk_command_limit=integer(0))
    bounce: BounceConfig = _section(top, "bounce", BounceConfig, double_bounce_to=mail_address)
    dsn: DSNConfig = _section(top, "dsn", DSNConfig, offer_to_untrusted=boolean)
    chaos = top.get("chaos", default_of(Config, "chaos"), boolean)
    metrics = _metrics(top.section("metrics"), listeners)
    top.done()
    return Config(hostname=hostname, listeners=listeners, mynetworks=mynetworks,
                  relay_domains=relay_domains, auth=auth, queue=queue_cfg,
                  delivery=delivery, limits=limits, metrics=metrics, bounce=bounce,
                  local_domains=local_domains, mailboxes=mailboxes, dsn=dsn, mydestination=mydestination,
                  postmaster=postmaster, chaos=chaos, source=source)


def _queue(queue: Section) -> QueueConfig:
    path = queue.get("path", default_queue_path(), string)
    backend = queue.get("backend", default_of(QueueConfig, "backend"), choice(QUEUE_BACKENDS))
    dsn = queue.get("dsn", None, postgresql_dsn)
    lease = queue.get("lease", default_of(QueueConfig, "lease"), parse_duration)
    if backend == "postgresql" and dsn is None:
        raise ConfigError("queue.dsn", "missing (backend postgresql needs the database's URI)")
    if backend == "sqlite" and dsn is not None:
        raise ConfigError("queue.dsn", "only used with backend: postgresql")
    if lease < MIN_LEASE:
        raise ConfigError("queue.lease", f"{lease:g}s is too short (at least {MIN_LEASE:g}s: "
                          "a node renews its leases every third of it)")
    queue.done()
    return QueueConfig(path=path, backend=backend, dsn=dsn, lease=lease)


def _listeners(top: Section) -> tuple[ListenerConfig, ...]:
    listeners = top.get("listeners", DEFAULT_LISTENERS, list_of(_listener))
    if not listeners:
        raise ConfigError("listeners", "at least one listener is needed")
    names = [item.name for item in listeners]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(f"listeners[{i}].name", f'"{name}" is used twice')
    for i, item in enumerate(listeners):
        _check_address_free(f"listeners[{i}].address", (item.host, item.port), listeners[:i])
    return listeners


def _listener(value: Any, path: str) -> ListenerConfig:
    sec = Section(value, path)
    name = sec.get("name", None, string)
    if name is None:
        raise ConfigError(sec.key("name"), "missing")
    address = sec.get("address", None, parse_hostport)
    if address is None:
        raise ConfigError(sec.key("address"), "missing")
    mode = sec.get("mode", default_of(ListenerConfig, "mode"), choice(LISTENER_MODES))
    tls_section = sec.section("tls")
    tls = _tls(tls_section) if sec.data.get("tls") is not None else None
    insecure = sec.get("allow_insecure_auth", default_of(ListenerConfig, "allow_insecure_auth"), boolean)
    users_file = sec.get("users_file", default_of(ListenerConfig, "users_file"), string)
    if users_file is not None and mode != "http":
        raise ConfigError(sec.key("users_file"), f'only an http listener has a users_file (this one is "{mode}";'
                          " SMTP AUTH uses auth.users_file, POP3 mailboxes.users_file)")
    if mode == "http" and tls is not None and tls.implicit:
        raise ConfigError(sec.key("tls.implicit"), "an http listener with tls always speaks HTTPS (leave it out)")
    sec.done()
    return ListenerConfig(name=name, host=address[0], port=address[1], mode=mode, tls=tls,
                          allow_insecure_auth=insecure, users_file=users_file)


def _tls(sec: Section) -> TLSConfig:
    cert = sec.get("cert", None, string)
    key = sec.get("key", None, string)
    if cert is None or key is None:
        raise ConfigError(sec.key("cert" if cert is None else "key"), "missing")
    tls = TLSConfig(cert=cert, key=key, **_settings(sec, TLSConfig, min_version=choice(TLS_VERSIONS),
                                                    ciphers=cipher_list, implicit=boolean))
    sec.done()
    return tls


def _check_not_relayed(key: str, domains: tuple[str, ...], relay_domains: tuple[str, ...]) -> None:
    for i, domain in enumerate(domains):
        if domain in relay_domains:
            raise ConfigError(f"{key}[{i}]", f'"{domain}" is also in relay_domains'
                              " (mail for it is either kept here or relayed)")


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


def _destination(value: Any, path: str) -> str:
    """A mydestination entry: a domain, or "$myhostname" (our hostname, as in Postfix)."""
    return value if value == "$myhostname" else domain_name(value, path)


def _delivery(sec: Section) -> DeliveryConfig:
    dns: DNSConfig = _section(sec, "dns", DNSConfig, nameservers=list_of(ip_address_text), port=port_number,
                              timeout=parse_duration)
    cache: ConnectionCacheConfig = _section(sec, "connection_cache", ConnectionCacheConfig,
                                            max_messages=integer(1), idle_timeout=parse_duration)
    retry = _retry(sec.section("retry"))
    timeouts: TimeoutsConfig = _section(sec, "timeouts", TimeoutsConfig, connect=parse_duration,
                                        command=parse_duration)
    cfg = DeliveryConfig(dns=dns, connection_cache=cache, retry=retry, timeouts=timeouts, **_settings(
        sec, DeliveryConfig, tls=choice(DELIVERY_TLS_MODES), smarthost=_smarthost, port=port_number,
        concurrency=integer(1), per_destination_concurrency=integer(1), routes=_routes))
    sec.done()
    return cfg


def _retry(sec: Section) -> RetryConfig:
    retry = RetryConfig(**_settings(sec, RetryConfig, min_backoff=parse_duration, max_backoff=parse_duration,
                                    max_lifetime=parse_duration, delay_warning=parse_duration))
    if retry.max_backoff < retry.min_backoff:
        raise ConfigError(sec.key("max_backoff"), "is smaller than min_backoff")
    sec.done()
    return retry


def _smtp_hostport(value: Any, path: str) -> tuple[str, int]:
    return parse_hostport(value, path, default_port=SMTP_PORT)


def _routes(value: Any, path: str) -> tuple[tuple[str, str, int], ...]:
    if not isinstance(value, dict):
        raise ConfigError(path, f"{show(value)} is not a mapping of domain to host:port")
    out: list[tuple[str, str, int]] = []
    for domain, target in value.items():
        name = domain_name(domain, f"{path}.{domain}")
        host, port = _smtp_hostport(target, f"{path}.{domain}")
        out.append((name, host, port))
    return tuple(out)


def _smarthost(value: Any, path: str) -> SmarthostConfig:
    if isinstance(value, str):
        host, port = _smtp_hostport(value, path)
        return SmarthostConfig(host, port)
    sec = Section(value, path)
    address = sec.get("address", None, _smtp_hostport)
    if address is None:
        raise ConfigError(sec.key("address"), "missing")
    cfg = SmarthostConfig(address[0], address[1], **_settings(sec, SmarthostConfig, username=string,
                                                              password=string))
    sec.done()
    return cfg


def _metrics(sec: Section, listeners: tuple[ListenerConfig, ...]) -> MetricsConfig:
    default = (default_of(MetricsConfig, "host"), default_of(MetricsConfig, "port"))
    address = sec.get("address", default, _metrics_address)
    metrics = MetricsConfig(host=address[0] if address else None, port=address[1] if address else 0)
    if address:
        _check_address_free(sec.key("address"), address, listeners)
    sec.done()
    return metrics


def _metrics_address(value: Any, path: str) -> tuple[str, int] | None:
    if value in (None, False, "off", "none"):
        return None
    return parse_hostport(value, path)


# --------------------------------------------------------------------------- reloading and files

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

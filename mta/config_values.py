"""The value syntax of the config file: how one YAML value becomes a setting.

Each converter takes the raw YAML value and its key path and returns the
setting, or raises a ConfigError naming that path
(``delivery.retry.min_backoff: "5x" is not a duration``). ``Section`` reads one
mapping of the file with such converters and rejects keys nobody asked for.
Which key takes which converter, and its default, is mta/config.py's business.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from mta.errors import ConfigError

T = TypeVar("T")
D = TypeVar("D")

# A converter: (YAML value, key path) -> setting, or ConfigError(key path, why).
Converter = Callable[[Any, str], T]

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
HOST_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


def show(value: Any) -> str:
    """A value as an error line quotes it: strings in double quotes, the rest as repr."""
    return f'"{value}"' if isinstance(value, str) else repr(value)


# --------------------------------------------------------------------------- units

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
    raise ConfigError(path, f"{show(value)} is not a duration")


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
    raise ConfigError(path, f"{show(value)} is not a size")


# --------------------------------------------------------------------------- addresses and names

def parse_hostport(value: Any, path: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port', '[::1]:port' (or 'host' when a default port applies)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"{show(value)} is not an address (want host:port)")
    text = value.strip()
    # "[host]:port" as in Postfix's relayhost, and the only way to write an IPv6 literal.
    m = re.fullmatch(r"\[([0-9A-Za-z:._-]+)\](?::(\d+))?", text) or re.fullmatch(
        r"([^:\[\]\s]+)(?::(\d+))?", text
    )
    if not m or (m.group(2) is None and default_port is None):
        raise ConfigError(path, f"{show(value)} is not an address (want host:port)")
    host = m.group(1)
    port = int(m.group(2)) if m.group(2) is not None else int(default_port or 0)
    if not 0 < port < 65536:
        raise ConfigError(path, f"{show(value)} has a port outside 1-65535")
    return host, port


def network(value: Any, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ConfigError(path, f"{show(value)} is not a CIDR network") from None


def ip_address_text(value: Any, path: str) -> str:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        raise ConfigError(path, f"{show(value)} is not an IP address") from None


def domain_name(value: Any, path: str) -> str:
    """A mail domain, lower case and without a trailing dot."""
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+\.?", value) or value.startswith("."):
        raise ConfigError(path, f"{show(value)} is not a domain name")
    return value.lower().rstrip(".")


def host_name(value: Any, path: str) -> str:
    if not isinstance(value, str) or not HOST_NAME.fullmatch(value):
        raise ConfigError(path, f"{show(value)} is not a host name")
    return value


def mail_address(value: Any, path: str) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[^@\s<>]+@[A-Za-z0-9_.-]+", value):
        raise ConfigError(path, f"{show(value)} is not a mail address (user@domain)")
    return value


def cipher_list(value: Any, path: str) -> str:
    """An OpenSSL cipher list that selects at least one cipher."""
    ciphers = string(value, path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
    except ssl.SSLError:
        raise ConfigError(path, f"{show(ciphers)} selects no cipher OpenSSL knows") from None
    return ciphers


# --------------------------------------------------------------------------- plain values

def integer(minimum: int = 0) -> Converter[int]:
    def convert(value: Any, path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"{show(value)} is not an integer")
        if value < minimum:
            raise ConfigError(path, f"{value} is below the minimum of {minimum}")
        return value
    return convert


def port_number(value: Any, path: str) -> int:
    port = integer(1)(value, path)
    if port > 65535:
        raise ConfigError(path, f"{port} is not a port (1-65535)")
    return port


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(path, f"{show(value)} is not true or false")
    return value


def string(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(path, f"{show(value)} is not a string")
    return value


def postgresql_dsn(value: Any, path: str) -> str:
    """A libpq connection URI: postgresql://user@host:port/dbname?param=value, with
    several hosts as host1:port1,host2:port2 (a primary and its standby:
    ?target_session_attrs=read-write picks the writable one). Only its form is
    checked: the database need not be up (`mta check-config`). A password written in
    it is allowed (libpq takes it) but PGPASSWORD or ~/.pgpass keep it out of the file."""
    text = string(value, path)
    shown = show(redacted_dsn(text))
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError as exc:
        raise ConfigError(path, f"{shown} is not a PostgreSQL URI ({exc})") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(path, f"{shown} is not a PostgreSQL URI (postgresql://user@host:port/database)")
    hosts = parts.netloc.rpartition("@")[2]
    for host in hosts.split(",") if hosts else ():
        port = host.rpartition("]")[2].rpartition(":")[2] if ":" in host.rpartition("]")[2] else ""
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigError(path, f"{shown} has a port outside 1-65535 ({port})")
    return text


def redacted_dsn(dsn: str) -> str:
    """``dsn`` fit for a log line or an error: the password, if any, as ***."""
    try:
        parts = urllib.parse.urlsplit(dsn)
    except ValueError:
        return dsn
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def choice(options: Sequence[str]) -> Converter[str]:
    """A string that must be one of ``options``."""
    def convert(value: Any, path: str) -> str:
        text = string(value, path)
        if text not in options:
            raise ConfigError(path, f"{show(text)} is not one of {', '.join(options)}")
        return text
    return convert


def list_of(item: Converter[T]) -> Converter[tuple[T, ...]]:
    def convert(value: Any, path: str) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise ConfigError(path, f"{show(value)} is not a list")
        return tuple(item(v, f"{path}[{i}]") for i, v in enumerate(value))
    return convert


# --------------------------------------------------------------------------- mappings

class Section:
    """A mapping being read: remembers its key path and rejects unknown keys."""

    def __init__(self, data: Any, path: str):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(path or "(top level)", f"{show(data)} is not a mapping")
        self.data: dict[Any, Any] = data
        self.path = path
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, default: D, convert: Converter[T]) -> T | D:
        """The key's converted value; ``default`` when it is absent (or null, if the default is None)."""
        self.used.add(name)
        if name not in self.data or self.data[name] is None and default is None:
            return default
        return convert(self.data[name], self.key(name))

    def section(self, name: str) -> Section:
        self.used.add(name)
        return Section(self.data.get(name), self.key(name))

    def done(self) -> None:
        """Every key has been read: any other is a misspelling, reported as such."""
        for name in self.data:
            if name not in self.used:
                raise ConfigError(self.key(str(name)), "unknown key")

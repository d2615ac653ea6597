"""Start-up checks shared by `mta serve` and `mta check-config`.

load_config only knows the file's syntax. What else keeps the daemon from
working is checked here, before anything is started, so that each problem is
one line naming it and exit status 2 -- not a traceback from deep inside the
start-up, a daemon left hanging, or one that starts and can never log anyone
in. `mta check-config` runs the same checks (as the user running it, without
creating or binding anything for good), so `check-config && systemctl restart`
finds them before the restart does.

In order: the queue directory, the queue lock (serve only: one daemon per
queue, mta/store/sqlite/lock.py), the database driver (queue.backend:
postgresql), TLS certificates and keys, the users files, then the listening
addresses (a test bind, the way the daemon binds). With a shared database the
queue directory still holds the node's lock file: one daemon per config on a
machine, whichever backend. Whether the database is up is not checked here:
`mta serve` finds out when it opens the store (one line, exit 1; systemd starts
it again), and `mta check-config` only warns.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

from mta.config import Config, ListenerConfig, TLSConfig
from mta.errors import StartupError
from mta.store.sqlite import lock as queue_lock


def startup(config: Config) -> queue_lock.QueueLock:
    """`mta serve`: every check, making the queue directory; returns the queue lock."""
    queue_directory(config.queue.path, create=True)
    held = queue_lock.acquire(config.queue.path)
    try:
        _files(config)
        for what, host, port in addresses(config):
            try_bind(what, host, port)
    except BaseException:
        held.release()
        raise
    return held


def check(config: Config) -> None:
    """`mta check-config`: the same checks without side effects.

    A daemon already serving this queue is normal here (checking a file before a
    reload or restart): its lock is not a fault, and the ports it holds are not
    tried, since they are in use by it."""
    queue_directory(config.queue.path, create=False)
    _files(config)
    if queue_lock.holder(config.queue.path) is None:
        for what, host, port in addresses(config):
            try_bind(what, host, port)


def _files(config: Config) -> None:
    if config.queue.backend == "postgresql" and importlib.util.find_spec("asyncpg") is None:
        raise StartupError("queue.backend: postgresql needs its driver (asyncpg is not installed): "
                           "pip install 'mta[postgresql]'")
    for i, lc in enumerate(config.listeners):
        if lc.tls is not None:
            tls_files(lc.tls, f"listeners[{i}].tls")
    # A users file that cannot be read means nobody can ever log in. Only that it
    # opens is checked here; its lines are mta/passwords.py's business, at run time.
    for key, path in users_files(config):
        readable(path, key)


def users_files(config: Config) -> list[tuple[str, str]]:
    """(config key, path) of every users file the daemon reads: SMTP AUTH's, the
    mailboxes' and each http listener's (basic auth)."""
    found = [(key, path) for key, path in (("auth.users_file", config.auth.users_file),
                                           ("mailboxes.users_file", config.mailboxes.users_file)) if path is not None]
    found += [(f"listeners[{i}].users_file", lc.users_file) for i, lc in enumerate(config.listeners)
              if lc.users_file is not None]
    return found


# --------------------------------------------------------------------------- the queue directory

def queue_directory(queue_path: str, *, create: bool) -> None:
    """The queue's directory exists (or can be made) and can be written: SQLite
    puts the -wal and -shm files beside the queue, and the lock lives there."""
    path = Path(queue_path)
    directory = path.parent
    if not directory.is_dir():
        _creatable(directory)   # the same message for serve and check-config
        if create:
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise StartupError(f"queue.path: cannot create directory {directory}: {reason}") from None
        else:
            return
    problem = _not_writable(directory)
    if problem:
        raise StartupError(f"queue.path: cannot write in directory {directory}: {problem}")
    if path.is_dir():
        raise StartupError(f"queue.path: {path}: Is a directory")
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise StartupError(f"queue.path: {path}: {os.strerror(13)}")   # EACCES


def _creatable(directory: Path) -> None:
    """What mkdir -p would say, found without making anything."""
    ancestor = directory
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    # ENOTDIR: a file where a directory should be
    problem = os.strerror(20) if not ancestor.is_dir() else _not_writable(ancestor)
    if problem:
        raise StartupError(f"queue.path: cannot create directory {directory}: {problem}")


def _not_writable(directory: Path) -> str | None:
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return os.strerror(30)   # EROFS
    except OSError as exc:
        return exc.strerror or str(exc)
    if not os.access(directory, os.W_OK | os.X_OK):
        return os.strerror(13)   # EACCES
    return None


# --------------------------------------------------------------------------- files

def readable(path: str, key: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise StartupError(f"{key}: {path}: {exc.strerror or exc}") from None


class _Encrypted(Exception):
    """The key asks for a passphrase (OpenSSL would otherwise prompt on the terminal)."""


def _no_passphrase() -> bytes:
    raise _Encrypted


def tls_files(tls: TLSConfig, key: str) -> None:
    """The certificate and key load, and belong together (as make_tls_context will load them)."""
    readable(tls.cert, f"{key}.cert")
    readable(tls.key, f"{key}.key")
    try:
        ssl.create_default_context().load_verify_locations(cafile=tls.cert)
    except ssl.SSLError:
        raise StartupError(f"{key}.cert: {tls.cert}: no PEM certificate in it") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert, tls.key, password=_no_passphrase)
    except _Encrypted:
        raise StartupError(f"{key}.key: {tls.key}: the key is encrypted (a passphrase is not supported)") \
            from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise StartupError(f"{key}.key: {tls.key} does not match the certificate {tls.cert}") from None
        raise StartupError(f"{key}.key: {tls.key}: no PEM private key in it") from None


# --------------------------------------------------------------------------- listening addresses

def addresses(config: Config) -> Iterator[tuple[str, str, int]]:
    """(what to call it in a message, host, port) for every socket the daemon binds."""
    for lc in config.listeners:
        yield _listener_socket(lc), lc.host, lc.port
    if config.metrics.host is not None:
        yield _metrics_socket(config), config.metrics.host, config.metrics.port


def _listener_socket(lc: ListenerConfig) -> str:
    return f"listeners: cannot listen on {lc.address} (listener {lc.name})"


def _metrics_socket(config: Config) -> str:
    host, port = config.metrics.host, config.metrics.port
    return f"metrics.address: cannot listen on {f'[{host}]' if host and ':' in host else host}:{port}"


def cannot_listen(lc: ListenerConfig, exc: OSError) -> StartupError:
    """The message for a listener's bind that failed in the daemon itself (taken
    between the preflight and the bind), the same as the preflight's."""
    return StartupError(f"{_listener_socket(lc)}: {_reason(exc)}")


def metrics_cannot_listen(config: Config, exc: OSError) -> StartupError:
    return StartupError(f"{_metrics_socket(config)}: {_reason(exc)}")


def _reason(exc: OSError) -> str:
    # uvloop's errors carry their own wording ("error while attempting to bind on
    # address ..."); the errno's text is the same whichever loop runs.
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return exc.strerror or str(exc)
    return os.strerror(exc.errno)


def try_bind(what: str, host: str, port: int) -> None:
    """Bind (without listening) as asyncio's create_server does: SO_REUSEADDR, and
    IPV6_V6ONLY on IPv6 sockets. Nothing listens, so nothing is left behind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_UNSPEC
    try:
        infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        for af, kind, proto, _, sockaddr in dict.fromkeys(infos):
            with socket.socket(af, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if af == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
    except OSError as exc:
        raise StartupError(f"{what}: {_reason(exc)}") from None

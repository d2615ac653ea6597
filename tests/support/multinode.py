"""Several real `mta serve` nodes on one PostgreSQL database (issue 16), for the
end-to-end tests in tests/test_multinode.py.

Each :class:`Node` is one `mta serve` process (and its delivery child) with its own
``hostname``, listeners, metrics address, directory and log file; all of them name
the same ``queue: {backend: postgresql, dsn: ...}``. Next hops are found by MX on
the loopback DNS server (tests/support/fakedns.py) and are a :class:`NextHop`: a
RecordingPeer that holds its reply to the end of DATA, knows which node sent each
message (the EHLO name: a node greets with its ``hostname``) and can be told that
a node died, after which what that node had in flight is not accepted.

    async with nodes_running(a, b):
        reply = await send_message(a.smtp_port, 1, "r1@example.test")
        ...

Everything here is async or runs in a thread: the next hops run on the test's
event loop and must keep answering while the nodes work.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.daemon import children, mta_command, start_daemon, subprocess_env, wait_listening
from tests.support.fakedns import FakeDNS
from tests.support.ports import free_port
from tests.support.smtp_peer import END_OF_DATA, Connection, RecordingPeer
from tests.support.wire import Wire

NODE_A = "node-a.lab.example"
NODE_B = "node-b.lab.example"
LEASE = 3.0               # queue.lease of every node: short, so a dead node's work is taken over soon
MIN_BACKOFF = 0.5         # delivery.retry.min_backoff
CLIENT_DOMAIN = "clients.lab.example"

QUEUED = re.compile(r"^250 2\.0\.0 Ok: queued as (\w+)$")
MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>\r$", re.MULTILINE | re.IGNORECASE)
RECEIVED_BY = re.compile(rb"^\tby (\S+) \(mta\) with \w+ id (\w+)\r$", re.MULTILINE)
SENT_LINE = re.compile(r": (\w+): to=<([^>]+)>, relay=.*, status=sent ")


# ----------------------------------------------------------------- nodes

def node_doc(hostname: str, dsn: str, *, dns: FakeDNS | None = None, peer_port: int | None = None,
             pop3: bool = False, http: bool = False, mailbox_users: Path | None = None,
             **extra: Any) -> dict[str, Any]:
    """One node's config: its own relay listener (and pop3/http listeners when asked),
    its own metrics address, the shared database with a short lease, short backoffs,
    delivery through the loopback DNS to ``peer_port``; ``extra`` overrides top-level keys."""
    listeners: list[dict[str, Any]] = [
        {"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"}]
    if pop3:
        listeners.append({"name": "pop3", "address": f"127.0.0.1:{free_port()}", "mode": "pop3",
                          "allow_insecure_auth": True})
    if http:
        listeners.append({"name": "web", "address": f"127.0.0.1:{free_port()}", "mode": "http"})
    delivery: dict[str, Any] = {
        "retry": {"min_backoff": f"{MIN_BACKOFF}s", "max_backoff": "2s"},
        "connection_cache": {"idle_timeout": "1s"},
        "timeouts": {"connect": "2s", "command": "10s"},
        "per_destination_concurrency": 10,
    }
    if dns is not None:
        delivery["dns"] = {"nameservers": ["127.0.0.1"], "port": dns.port, "timeout": "2s"}
    if peer_port is not None:
        delivery["port"] = peer_port
    doc: dict[str, Any] = {
        "hostname": hostname,
        "listeners": listeners,
        "queue": {"backend": "postgresql", "dsn": dsn, "lease": f"{LEASE:g}s"},
        "metrics": {"address": f"127.0.0.1:{free_port()}"},
        "delivery": delivery,
        "limits": {"max_connections_per_ip": 200},
    }
    if mailbox_users is not None:
        doc["local_domains"] = ["lab.test"]
        doc["mailboxes"] = {"users_file": str(mailbox_users)}
    doc.update(extra)
    return doc


def _port(listener: dict[str, Any]) -> int:
    return int(str(listener["address"]).rsplit(":", 1)[1])


class Node:
    """One `mta serve` process: ``doc`` written to ``directory``/mta.yaml, its output
    appended to ``directory``/mta.log."""

    def __init__(self, directory: Path, doc: dict[str, Any], **env: str):
        directory.mkdir(parents=True, exist_ok=True)
        # The node's lock file stays in the queue directory whatever the backend
        # (mta/preflight.py): one daemon per config on a machine, so each node its own.
        doc["queue"].setdefault("path", str(directory / "queue.db"))
        self.name = str(doc["hostname"])
        self.doc = doc
        self.env = env
        self.config_path = directory / "mta.yaml"
        self.config_path.write_text(yaml.safe_dump(doc))
        self.log_path = directory / "mta.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def listener_port(self, mode: str) -> int:
        return next(_port(lc) for lc in self.doc["listeners"] if lc["mode"] == mode)

    @property
    def smtp_port(self) -> int:
        return self.listener_port("relay")

    @property
    def pop3_port(self) -> int:
        return self.listener_port("pop3")

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.listener_port('http')}"

    @property
    def metrics_base(self) -> str:
        return f"http://{self.doc['metrics']['address']}"

    # -------------------------------------------------------------- life
    def start(self) -> None:
        self.proc = start_daemon(self.config_path, self.log_path, **self.env)

    async def wait_listening(self, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        assert self.proc is not None
        await wait_listening(self.smtp_port, self.proc, timeout, self.log_tail)

    async def wait_ready(self, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        """Until it listens and its queue manager runs (mta_delivery_process_up 1: `mta
        serve` is ready before its delivery process is)."""
        deadline = time.monotonic() + timeout
        await self.wait_listening(timeout)
        while not await self._delivering():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no queue manager after {timeout} s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    async def _delivering(self) -> bool:
        try:
            return (await self.metrics("mta_delivery_process_up")).get("mta_delivery_process_up") == 1.0
        except OSError:   # urllib's URLError: the metrics listener starts after the SMTP ones
            return False

    async def wait_exit(self, timeout: float) -> int:  # noqa: ASYNC109
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while (rc := self.proc.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} still running after {timeout} s:\n{self.log_tail()}")
            await asyncio.sleep(0.02)
        return rc

    def delivery_children(self) -> list[int]:
        assert self.proc is not None
        return children(self.proc.pid)

    async def kill(self) -> None:
        """SIGKILL, as a machine that dies: the main process and its delivery child at once
        (the child would get SIGKILL through PR_SET_PDEATHSIG anyway, a moment later)."""
        assert self.proc is not None
        pids = self.delivery_children()
        self.proc.send_signal(signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await self.wait_exit(10)

    async def terminate(self, timeout: float = 20.0) -> int:  # noqa: ASYNC109
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait_exit(timeout)

    def ensure_dead(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    # -------------------------------------------------------------- what it says
    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return f"---- {self.name} ----\n" + "\n".join(self.log_text().splitlines()[-lines:])

    def sent(self) -> list[tuple[str, str]]:
        """(queue id, recipient) of every ``status=sent`` line this node logged."""
        return [(m.group(1), m.group(2)) for m in SENT_LINE.finditer(self.log_text())]

    async def http_get(self, url: str) -> tuple[int, str]:
        """(status, body) of a GET, in a thread (urllib blocks)."""
        def get() -> tuple[int, str]:
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    return resp.status, resp.read().decode()
            except urllib.error.HTTPError as exc:
                return exc.code, exc.read().decode()
        return await asyncio.to_thread(get)

    async def healthz(self) -> tuple[int, str]:
        return await self.http_get(self.metrics_base + "/healthz")

    async def metrics(self, prefix: str) -> dict[str, float]:
        """The /metrics samples whose name starts with ``prefix``: 'name{labels}' -> value."""
        status, text = await self.http_get(self.metrics_base + "/metrics")
        assert status == 200, (status, text)
        samples = {}
        for line in text.splitlines():
            if line.startswith(prefix):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples

    async def api_json(self, path: str) -> Any:
        status, body = await self.http_get(self.http_base + path)
        assert status == 200, (status, body)
        return json.loads(body)


@contextlib.asynccontextmanager
async def nodes_running(*nodes: Node) -> AsyncIterator[tuple[Node, ...]]:
    """Start every node at once (they migrate the schema together: one waits on the
    other's advisory lock), wait until each listens and delivers; stop those still running on exit
    (SIGTERM, then SIGKILL for one that hangs) and say what each logged on failure."""
    try:
        for node in nodes:
            node.start()
        await asyncio.gather(*(node.wait_ready() for node in nodes))
        yield nodes
    finally:
        for node in nodes:
            try:
                await node.terminate()
            except AssertionError:
                node.ensure_dead()
            finally:
                node.ensure_dead()


def mta_cli(config: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`mta ARGS --config config` to its end (run it in a thread from async code)."""
    return subprocess.run(mta_command(*args, "--config", str(config)), capture_output=True, text=True,
                          timeout=timeout, env=subprocess_env(), check=False)


# ----------------------------------------------------------------- clients

def message_bytes(seq: int, *, extra: bytes = b"") -> bytes:
    """Message number ``seq``: its Message-ID says the number (the count key at the next hop)."""
    return (f"From: <client{seq}@{CLIENT_DOMAIN}>\r\nTo: <r{seq}@example.test>\r\n"
            f"Subject: message {seq}\r\nMessage-ID: <{seq}@{CLIENT_DOMAIN}>\r\n").encode() + extra + \
        f"\r\nbody of message {seq}\r\n".encode()


def message_id(seq: int) -> str:
    return f"{seq}@{CLIENT_DOMAIN}"


async def transaction(port: int, sender: str, recipients: Sequence[str], data: bytes) -> str | None:
    """One SMTP transaction on a new connection: the first reply that is not positive
    (or the final reply to DATA), None if the connection failed or broke (then the
    outcome is unknown). ``data`` is sent dot-stuffed."""
    try:
        wire = await Wire.connect("127.0.0.1", port)
    except (OSError, ConnectionError, TimeoutError):
        return None
    try:
        await wire.ehlo(f"client.{CLIENT_DOMAIN}")
        reply = await wire.cmd(f"MAIL FROM:<{sender}>", timeout=15)
        if not reply.startswith("250"):
            return reply
        for rcpt in recipients:
            reply = await wire.cmd(f"RCPT TO:<{rcpt}>", timeout=15)
            if not reply.startswith("250"):
                return reply
        reply = await wire.cmd("DATA", timeout=15)
        if not reply.startswith("354"):
            return reply
        await wire.send(data.replace(b"\r\n.", b"\r\n.."), crlf=False)
        return await wire.cmd(b".", timeout=30)
    except (OSError, ConnectionError, TimeoutError):
        return None
    finally:
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            await asyncio.wait_for(wire.cmd("QUIT"), 2)
        await wire.close()


async def send_message(port: int, seq: int, rcpt: str | None = None) -> str | None:
    """message_bytes(seq) from client<seq>@… to ``rcpt`` (r<seq>@example.test)."""
    return await transaction(port, f"client{seq}@{CLIENT_DOMAIN}", [rcpt or f"r{seq}@example.test"],
                             message_bytes(seq))


def queue_id(reply: str | None) -> str | None:
    match = QUEUED.match(reply or "")
    return match.group(1) if match else None


@dataclass
class Sent:
    """What the clients were told: seq -> queue id for a 250, seq -> reply for the rest."""
    accepted: dict[int, str] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)     # a reply other than 250 (4xx/5xx)
    unknown: set[int] = field(default_factory=set)            # the connection broke: no reply

    def record(self, seq: int, reply: str | None) -> None:
        if (qid := queue_id(reply)) is not None:
            self.accepted[seq] = qid
        elif reply is None:
            self.unknown.add(seq)
        else:
            self.refused[seq] = reply


# ----------------------------------------------------------------- the next hop

@dataclass(frozen=True)
class Arrival:
    """One message the next hop accepted (answered 250 to)."""
    node: str           # the node that sent it: its EHLO name
    message_id: str     # the client's Message-ID
    queue_id: str       # the accepting node's queue id, from its Received: line
    accepted_by: str    # the node that accepted it from the client (same Received: line)
    answered: float     # time.monotonic() of the 250


def ehlo_name(conn: Connection) -> str:
    first = conn.transcript[0] if conn.transcript else ""
    return first.split(" ", 1)[1] if first.upper().startswith(("EHLO ", "HELO ")) else ""


class NextHop:
    """A RecordingPeer that holds its reply to the end of DATA ``hold`` seconds. Once
    :meth:`declare_dead` names a node, a message of that node whose reply is still held
    is refused (451) and not recorded: the test's model of a next hop that notices its
    client went away before it answered. So a message is recorded (and counts as
    delivered) exactly when its 250 was sent."""

    def __init__(self, host: str, port: int, *, hold: float = 0.0):
        self.hold = hold
        self.dead: set[str] = set()
        self.peer = RecordingPeer(host, port, replies=self._reply)
        self._answered: dict[tuple[int, int], float] = {}   # (connection, message no.) -> 250 time

    async def __aenter__(self) -> NextHop:
        await self.peer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.peer.stop()

    def declare_dead(self, node: str) -> None:
        self.dead.add(node)

    async def _reply(self, verb: str, arg: str, conn: Connection) -> str | None:
        if verb != END_OF_DATA:
            return None
        if self.hold:
            await asyncio.sleep(self.hold)
        if ehlo_name(conn) in self.dead:
            return "451 4.4.2 client gone before the reply: message discarded"
        self._answered[(conn.number, len(conn.messages))] = time.monotonic()
        return None   # the default: 250, recorded

    def arrivals(self) -> list[Arrival]:
        found = []
        for conn in list(self.peer.connections):
            node = ehlo_name(conn)
            for n, message in enumerate(list(conn.messages)):
                mid = MESSAGE_ID.search(message.data)
                received = RECEIVED_BY.search(message.data)
                found.append(Arrival(node, mid.group(1).decode() if mid else "",
                                     received.group(2).decode() if received else "",
                                     received.group(1).decode() if received else "",
                                     self._answered.get((conn.number, n), 0.0)))
        return found

    def counts(self) -> Counter[str]:
        """Message-ID -> how many times it arrived."""
        return Counter(a.message_id for a in self.arrivals())

    async def wait_for(self, message_ids: set[str], timeout: float) -> float:  # noqa: ASYNC109
        """Until every one of ``message_ids`` arrived; the seconds it took. AssertionError
        naming how many are missing after ``timeout``."""
        start = time.monotonic()
        while not message_ids <= set(self.counts()):
            if time.monotonic() - start > timeout:
                missing = message_ids - set(self.counts())
                raise AssertionError(f"{len(missing)} of {len(message_ids)} messages not delivered in "
                                     f"{timeout} s, e.g. {sorted(missing)[:5]}")
            await asyncio.sleep(0.02)
        return time.monotonic() - start


# ----------------------------------------------------------------- the database, read directly

async def query(dsn: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` read straight from the shared database (not through mta)."""
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return [tuple(row) for row in await conn.fetch(sql, *args)]
    finally:
        await conn.close()

"""Coverage-guided fuzz target: arbitrary bytes as one inbound SMTP session.

Each input is one client's side of a session. The first byte picks the listener
(bit 0: relay or submission with AUTH) and whether the client is in mynetworks
(bit 1); the rest is fed to a real :class:`mta.inbound.session.InboundSMTP`,
built by :class:`mta.inbound.server.Listener` exactly as the daemon builds it,
over an in-memory transport (no sockets: thousands of sessions a second). The
queue is a stand-in that keeps nothing; passwords are checked by a stand-in for
the users file (scrypt would make every AUTH cost 50 ms).

A session fails the target when
  * an exception escapes the session task or reaches the event loop,
  * the session answers with aiosmtpd's local-error path (451 4.3.0 "local
    error in processing": an exception inside a command handler),
  * a reply line is not "ddd" + " " or "-", or lacks an RFC 3463 enhanced
    status code (the greeting, EHLO/HELO replies, 334 and 354 are exempt,
    RFC 2034 §3), or the output does not end with CRLF,
  * it does not settle (wait for more input or end) within 5 seconds.

Run by hand (libFuzzer options after the corpus directories):

    pip install atheris
    mkdir -p /tmp/mta-corpus
    python tests/fuzz/fuzz_inbound.py /tmp/mta-corpus tests/fuzz/seeds -max_total_time=3600 -jobs=2

New interesting inputs go into the first directory; a crash is written as
./crash-<sha1> and can be replayed with ``python tests/fuzz/fuzz_inbound.py crash-<sha1>``.
tests/test_adversarial.py runs it for a few seconds in the normal test suite
(skipped without atheris) and replays the seeds without it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:  # instrument our code and aiosmtpd for coverage feedback when run under atheris
    import atheris
except ImportError:  # pytest replays seeds without it
    atheris = None

if atheris is not None and __name__ == "__main__":
    with atheris.instrument_imports(include=["mta", "aiosmtpd", "email"]):
        from mta.config import build_config
        from mta.inbound.handler import AuthThrottle, InboundHandler  # AuthThrottle re-exported
        from mta.inbound.server import Listener
else:
    from mta.config import build_config
    from mta.inbound.handler import AuthThrottle, InboundHandler  # AuthThrottle re-exported
    from mta.inbound.server import Listener

HOSTNAME = "relay.lab.test"
SEEDS = Path(__file__).resolve().parent / "seeds"
_LINE = re.compile(rb"^\d{3}(?:[ -]|$)")
_ENHANCED = re.compile(rb"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
LOCAL_ERROR = b"451 4.3.0 Error: local error in processing"


class FuzzFailure(AssertionError):
    pass


class _Users:
    """Stands in for mta.passwords.UsersFile: alice / s3cret, no scrypt."""

    def refresh(self) -> None:
        pass   # the real one reads the file again if it changed

    def check(self, user: str, password: str) -> bool:
        return user == "alice" and password == "s3cret"


class _Store:
    """Stands in for the queue: takes any message, keeps nothing."""

    damaged = None   # Queue.damaged: never

    async def enqueue(self, message: Any) -> None:
        return None


class MemoryTransport(asyncio.Transport):
    """What a session writes goes to ``out``; close() ends the session like a socket would."""

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: tuple[str, int]):
        super().__init__()
        self.loop = loop
        self.peer = peer
        self.out = bytearray()
        self.closed = False
        self.protocol: asyncio.BaseProtocol | None = None

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": self.peer, "sockname": ("127.0.0.1", 25)}.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closed:
            self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                self.loop.call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return not self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False


class Harness:
    """One event loop and two listeners (relay, submission), reused for every input."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda loop, context: self.loop_errors.append(context))
        config = build_config({
            "hostname": HOSTNAME,
            "listeners": [
                {"name": "mta", "address": "127.0.0.1:2525", "mode": "relay"},
                {"name": "submission", "address": "127.0.0.1:2587", "mode": "submission",
                 "allow_insecure_auth": True},
            ],
            "mynetworks": ["127.0.0.0/8"],
            "relay_domains": ["ourhost.test"],
            "limits": {"message_size": 20000, "max_recipients": 5},
            "auth": {"users_file": "/nonexistent/users"},  # never read: _Users stands in
            "queue": {"path": "/nonexistent/queue.db"},   # never opened: _Store stands in
            "metrics": {"address": None},
        })
        store: Any = _Store()
        throttle = AuthThrottle(free_failures=10**9, window=1.0)  # no sleeping between guesses here
        self.listeners = [Listener(config, lc, InboundHandler(config, lc, store, users=_Users(), throttle=throttle))
                          for lc in config.listeners]
        self.listeners[0].handler.users = None  # as the daemon: AUTH only where offered

    def close(self) -> None:
        self.loop.close()

    def run(self, data: bytes) -> bytes:
        """Play one input; return what the server wrote. Raises FuzzFailure."""
        return self.loop.run_until_complete(self._session(data))

    async def _session(self, data: bytes) -> bytes:
        selector = data[0] if data else 0
        listener = self.listeners[selector & 1]
        peer = ("127.0.0.1" if selector & 2 else "192.0.2.7", 40000)
        protocol = listener._protocol()
        transport = MemoryTransport(self.loop, peer)
        transport.protocol = protocol
        protocol.connection_made(transport)
        task = protocol._handler_coroutine
        protocol.data_received(data[1:])
        await self._settle(protocol, task)
        transport.close()
        await asyncio.sleep(0)
        try:
            await asyncio.wait_for(asyncio.shield(task), 5)
        except asyncio.CancelledError:
            pass
        except TimeoutError:
            raise FuzzFailure("session did not end after connection_lost") from None
        except Exception as exc:  # noqa: BLE001 - anything escaping the session is the finding
            raise FuzzFailure(f"exception escaped the session: {exc!r}") from exc
        if self.loop_errors:
            errors, self.loop_errors[:] = list(self.loop_errors), []
            raise FuzzFailure(f"event loop errors: {errors!r}")
        check_replies(bytes(transport.out))
        return bytes(transport.out)

    async def _settle(self, protocol: Any, task: asyncio.Task[None]) -> None:
        """Until the session waits for input it will never get, or has ended."""
        reader = protocol._reader
        for i in range(100000):
            if task.done() or protocol.transport is None:
                return
            if reader._waiter is not None:   # blocked reading: it has consumed everything it can
                return
            await asyncio.sleep(0 if i < 200 else 0.001)   # an AUTH check runs in a thread
        raise FuzzFailure("session did not settle")


def split_replies(out: bytes) -> list[list[bytes]]:
    """The server's output as replies (lists of lines without CRLF)."""
    if out and not out.endswith(b"\r\n"):
        raise FuzzFailure(f"output does not end with CRLF: {out[-80:]!r}")
    replies: list[list[bytes]] = []
    current: list[bytes] = []
    for line in out.split(b"\r\n")[:-1]:
        if not _LINE.match(line):
            raise FuzzFailure(f"malformed reply line {line[:120]!r}")
        if current and line[:3] != current[0][:3]:
            raise FuzzFailure(f"multi-line reply changes its code: {current!r} then {line[:120]!r}")
        current.append(line)
        if line[3:4] != b"-":
            replies.append(current)
            current = []
    if current:
        raise FuzzFailure(f"unfinished multi-line reply {current!r}")
    return replies


def exempt(reply: list[bytes], first: bool) -> bool:
    """Replies RFC 2034 §3 lets go without an enhanced status code."""
    code = reply[0][:3]
    if first and code == b"220":
        return True   # the greeting
    if code in (b"334", b"354"):
        return True   # AUTH challenge, DATA go-ahead
    return code == b"250" and reply[0][4:].split(b" ")[0] == HOSTNAME.encode()  # EHLO / HELO


def check_replies(out: bytes) -> list[list[bytes]]:
    replies = split_replies(out)
    for n, reply in enumerate(replies):
        if reply[0] == LOCAL_ERROR:
            raise FuzzFailure("a command raised inside the session (451 4.3.0 local error)")
        if not exempt(reply, n == 0):
            for line in reply:
                if not _ENHANCED.match(line):
                    raise FuzzFailure(f"reply without an enhanced status code: {line[:120]!r}")
    return replies


_harness: Harness | None = None


def test_one_input(data: bytes) -> None:
    global _harness
    if _harness is None:
        logging.disable(logging.CRITICAL)   # aiosmtpd logs every command: too slow to fuzz with
        _harness = Harness()
    _harness.run(data)


def main() -> None:
    if atheris is None:
        sys.exit("atheris is not installed: pip install atheris")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

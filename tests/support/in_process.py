"""The daemon in the test's own process and event loop: an App serving until a block
ends, its listeners' ports, a message submitted over SMTP, the queue's rows."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence

from mta.config import Config
from mta.daemon.main_process import App
from tests.support.wire import Wire

# What submit() sends by default (dot-stuffed on the wire), and what the queue and the
# next hop hold after un-stuffing.
DEFAULT_BODY = b"Subject: relay me\r\nFrom: lab@lab.test\r\n\r\nline one\r\n..dot line\r\n"
DEFAULT_CONTENT = b"Subject: relay me\r\nFrom: lab@lab.test\r\n\r\nline one\r\n.dot line\r\n"


@contextlib.asynccontextmanager
async def running(config: Config, *, deliver: bool = False) -> AsyncIterator[App]:
    """An App serving on the test's event loop until the block ends.

    deliver=False runs the listeners and the queue only, so inbound tests see
    their messages stay queued exactly as accepted."""
    app = App(config, deliver=deliver)
    await app.start()
    try:
        yield app
    finally:
        await app.shutdown()


def listener_port(config: Config, name: str = "mta") -> int:
    return next(lc.port for lc in config.listeners if lc.name == name)


async def submit(config: Config, recipients: Sequence[str], body: bytes = DEFAULT_BODY,
                 sender: str = "lab@lab.test") -> str:
    """One message over SMTP to the "mta" listener; its queue id from the 250 reply."""
    async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
        reply = await w.mail(sender, list(recipients), body)
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply
    return reply.rsplit(" ", 1)[1]


def queue_rows(config: Config) -> list[tuple[str, str, str, int, str | None]]:
    """(queue id, address, state, attempts, last error) per recipient, oldest message first."""
    with sqlite3.connect(config.queue.path) as db:
        return db.execute("SELECT m.id, r.address, r.state, r.attempts, r.last_error FROM recipients r"
                          " JOIN messages m ON m.id = r.message_id ORDER BY m.arrival, r.rcpt_no").fetchall()

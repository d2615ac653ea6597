"""mta.delivery.pool: the outbound connection cache, checked on the wire."""

from __future__ import annotations

import asyncio
import time

import pytest

from mta.config import TimeoutsConfig
from mta.delivery.client import ConnectionLost, Session, connect
from mta.delivery.pool import ConnectionPool
from tests.support.smtp_peer import RecordingPeer

pytestmark = pytest.mark.timeout(10)

TIMEOUTS = TimeoutsConfig(connect=2.0, command=2.0)
BODY = b"Subject: test\r\n\r\nbody\r\n"


def make_pool(**overrides: float) -> ConnectionPool:
    settings = dict(max_messages=100, idle_timeout=5.0, per_destination=2, max_idle_total=10)
    settings.update(overrides)
    return ConnectionPool(**settings)  # type: ignore[arg-type]


async def session_for(pool: ConnectionPool, peer: RecordingPeer) -> Session:
    """What the router does: a cached session, or a new one (counted)."""
    session = await pool.acquire(key(peer))
    if session is None:
        session = await connect(peer.host, peer.port, server_name="mx.test", helo_name="relay.test",
                                tls="may", timeouts=TIMEOUTS)
        pool.note_opened()
    return session


def key(peer: RecordingPeer) -> str:
    return f"{peer.host}:{peer.port}"


async def send_one(pool: ConnectionPool, peer: RecordingPeer, n: int = 0) -> None:
    session = await session_for(pool, peer)
    results = await session.send("a@x.test", [f"b{n}@y.test"], BODY)
    assert results[f"b{n}@y.test"].code == 250
    await pool.release(key(peer), session)


def idle_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("idle ") and not t.done()]


async def test_ten_messages_share_one_connection_then_quit_when_idle() -> None:
    pool = make_pool(idle_timeout=0.3)
    async with RecordingPeer() as peer:
        for n in range(10):
            await send_one(pool, peer, n)
        released = time.monotonic()
        await peer.wait_finished()
        assert time.monotonic() - released >= 0.25   # QUIT came from the idle timer
        assert (pool.opened, pool.reused) == (1, 9)
        assert pool.idle_count == 0
        await pool.close()
    conn, = peer.connections
    assert conn.verbs == ["EHLO", "MAIL", "RCPT", "DATA"] + ["RSET", "MAIL", "RCPT", "DATA"] * 9 + ["QUIT"]
    assert len(peer.messages) == 10


async def test_max_messages_opens_a_new_connection() -> None:
    pool = make_pool(max_messages=3)
    async with RecordingPeer() as peer:
        for n in range(7):
            await send_one(pool, peer, n)
        await pool.close()
        await peer.wait_finished()
    one = ["MAIL", "RCPT", "DATA"]
    full = ["EHLO", *one, "RSET", *one, "RSET", *one, "QUIT"]
    assert [c.verbs for c in peer.connections] == [full, full, ["EHLO", *one, "QUIT"]]
    assert (pool.opened, pool.reused) == (3, 4)


async def test_421_while_idle_drops_the_session() -> None:
    pool = make_pool()
    async with RecordingPeer(idle_421_after=0.2) as peer:
        await send_one(pool, peer, 0)
        await peer.wait_for(lambda: peer.connections[0].finished)
        # The idle watcher saw the 421 and dropped the session without waiting for acquire.
        await asyncio.sleep(0.05)
        assert pool.idle_count == 0
        await send_one(pool, peer, 1)
        await pool.close()
        await peer.wait_finished()
    assert peer.connections[0].verbs == ["EHLO", "MAIL", "RCPT", "DATA"]   # no RSET, no QUIT
    assert peer.connections[0].closed_by_peer
    assert peer.connections[1].verbs == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert (pool.opened, pool.reused) == (2, 0)


async def test_unsolicited_data_is_caught_at_acquire_time() -> None:
    # Data that arrives just before acquire, before the watcher has run: rset() refuses.
    pool = make_pool()
    async with RecordingPeer() as peer:
        session = await session_for(pool, peer)
        await pool.release(key(peer), session)
        session._reader.feed_data(b"421 4.4.2 mx.test Error: timeout exceeded\r\n")
        assert await pool.acquire(key(peer)) is None
        await pool.close()
        await peer.wait_finished()
    assert peer.connections[0].verbs == ["EHLO"]


async def test_dead_session_is_not_cached() -> None:
    pool = make_pool()
    async with RecordingPeer(replies=lambda v, a, c: "421 4.3.2 Bye" if v == "RCPT" else None) as peer:
        session = await session_for(pool, peer)
        with pytest.raises(ConnectionLost):
            await session.send("a@x.test", ["b@y.test"], BODY)
        await pool.release(key(peer), session)
        assert pool.idle_count == 0
        await pool.close()


async def test_cache_limits_and_unreusable_sessions_are_quit() -> None:
    pool = make_pool(per_destination=1, max_idle_total=2)
    async with RecordingPeer("127.0.0.2") as p2, RecordingPeer("127.0.0.3") as p3, \
            RecordingPeer("127.0.0.4") as p4:
        a = await session_for(pool, p2)
        b = await session_for(pool, p2)
        await pool.release(key(p2), a)
        await pool.release(key(p2), b)          # per_destination=1: QUIT
        c = await session_for(pool, p3)
        d = await session_for(pool, p4)
        await pool.release(key(p3), c)
        await pool.release(key(p4), d)          # max_idle_total=2: QUIT
        assert pool.idle_count == 2
        e = await session_for(pool, p3)         # the cached one (its RSET would go with a transaction)
        await pool.release(key(p3), e, reusable=False)
        assert pool.idle_count == 1
        await pool.close()
        for peer in (p2, p3, p4):
            await peer.wait_finished()
    assert [c.verbs for c in p2.connections] == [["EHLO", "QUIT"], ["EHLO", "QUIT"]]
    assert [c.verbs for c in p3.connections] == [["EHLO", "QUIT"]]   # no transaction, nothing to reset
    assert [c.verbs for c in p4.connections] == [["EHLO", "QUIT"]]


async def test_close_quits_everything_and_leaves_no_tasks() -> None:
    pool = make_pool()
    async with RecordingPeer("127.0.0.2") as p2, RecordingPeer("127.0.0.3") as p3:
        await send_one(pool, p2)
        await send_one(pool, p3)
        assert pool.idle_count == 2 and len(idle_tasks()) == 2
        await pool.close()
        assert pool.idle_count == 0 and idle_tasks() == []
        await p2.wait_finished()
        await p3.wait_finished()
        # A session released after close() is QUIT at once.
        session = await session_for(pool, p2)
        await pool.release(key(p2), session)
        await p2.wait_finished()
    assert p2.connections[0].verbs[-1] == "QUIT" and p3.connections[0].verbs[-1] == "QUIT"
    assert p2.connections[1].verbs == ["EHLO", "QUIT"]


async def test_close_while_an_idle_quit_is_in_flight() -> None:
    async def slow_quit(verb: str, arg: str, conn: object) -> str | None:
        if verb == "QUIT":
            await asyncio.sleep(0.3)
        return None

    pool = make_pool(idle_timeout=0.05)
    async with RecordingPeer(replies=slow_quit) as peer:
        await send_one(pool, peer)
        await peer.wait_for(lambda: "QUIT" in peer.connections[0].verbs)
        await pool.close()   # waits for the watcher that is saying QUIT
        assert idle_tasks() == []

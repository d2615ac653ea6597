"""Faults against the real `mta serve` process: repeated SIGKILL under load, a full
disk, misbehaving next hops, DNS down or slow, SIGTERM under load.

The daemon runs as a child process (tests/support/daemon.py); its next hops are
RecordingPeers and small misbehaving servers on 127.0.0.2, 127.0.0.3, … in this
process. Messages carry a unique ``X-Seq`` header, so what the peers received can
be matched to what the clients were told. ``MTA_LONG_TESTS=1`` runs the long
versions (20 SIGKILL rounds instead of 5, 5 SIGTERM rounds instead of 2);
``MTA_FAULT_SEED=N`` replays the random choices of a run (each test prints its seed).

Each test prints its figures (run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import random
import re
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mta.daemon.main_process import App
from mta.errors import StoreError
from mta.model import NewMessage, Recipient
from mta.store.api import new_queue_id
from mta.store.sqlite.store import SQLiteStore
from tests.support.daemon import Daemon
from tests.support.fakedns import FakeDNS
from tests.support.faults import (
    LONG,
    Attempt,
    BadPeer,
    daemon_doc,
    garbage,
    greet_then_421,
    integrity,
    one_byte_a_second,
    pending_messages,
    recipient_rows,
    send_tagged,
    seq_counts,
    silent,
    tagged_body,
    wait_drained,
)
from tests.support.in_process import listener_port, running
from tests.support.ports import free_port
from tests.support.smtp_peer import END_OF_DATA, RecordingPeer
from tests.support.tmpfs import mounted_tmpfs


def _seed() -> int:
    seed = int(os.environ.get("MTA_FAULT_SEED", "0")) or random.randrange(1, 2**31)
    print(f"random seed: MTA_FAULT_SEED={seed}")
    return seed


# --------------------------------------------------------------------------- 1. repeated SIGKILL

@pytest.mark.timeout(600 if LONG else 90)
async def test_repeated_sigkill_under_load_loses_nothing(tmp_path):
    """Kill -9 at random moments while 20 clients send and the daemon delivers to a
    peer that answers 250 or 451 at random; then restart and drain. Every message
    that got a 250 reached the peer; duplicates (a kill between the peer's 250 and
    our commit) are counted and printed."""
    rounds = 20 if LONG else 5
    clients = 20
    rng = random.Random(_seed())
    peer_rng = random.Random(rng.random())

    def flaky(verb: str, arg: str, conn: object) -> str | None:
        if verb == END_OF_DATA and peer_rng.random() < 0.4:
            return "451 4.3.0 Try again later"
        return None

    async with RecordingPeer("127.0.0.2", replies=flaky) as peer:
        daemon = Daemon(tmp_path, daemon_doc(tmp_path, free_port(), smarthost=f"127.0.0.2:{peer.port}"))
        seqs = itertools.count()
        attempts: list[Attempt] = []
        try:
            for _ in range(rounds):
                await daemon.started()
                stop = asyncio.Event()

                async def client(stop: asyncio.Event = stop) -> None:   # this round's event
                    while not stop.is_set():
                        attempt = await send_tagged(daemon.port, next(seqs))
                        attempts.append(attempt)
                        if attempt.outcome != "accepted":
                            return  # the daemon is gone (or going): wait for the next round

                tasks = [asyncio.create_task(client()) for _ in range(clients)]
                await asyncio.sleep(rng.uniform(0.05, 1.5))   # a random moment of the load
                await daemon.kill()
                stop.set()
                await asyncio.gather(*tasks)
            # The last start: no more load, let the queue drain.
            await daemon.started()
            await wait_drained(daemon, 60)
            assert await daemon.terminate() == 0
        finally:
            daemon.ensure_dead()
        await peer.wait_finished(5)

    accepted = {a.seq for a in attempts if a.outcome == "accepted"}
    cut_off = {a.seq for a in attempts if a.outcome != "accepted"}
    delivered = seq_counts(peer.messages)
    lost = sorted(accepted - set(delivered))
    duplicates = {seq: n for seq, n in sorted(delivered.items()) if n > 1}
    tries = peer.counts[END_OF_DATA]
    print(f"repeated SIGKILL: rounds={rounds}, clients={clients}, transactions={len(attempts)}, "
          f"accepted={len(accepted)}, cut off by a kill={len(cut_off)}, peer DATA attempts={tries}, "
          f"delivered={len(delivered)}, lost={len(lost)}, duplicates={sum(duplicates.values()) - len(duplicates)}"
          f" {duplicates}")
    assert lost == []
    # Nothing arrives that no client sent; a cut-off transaction may or may not have been committed.
    assert set(delivered) <= accepted | cut_off
    assert len(accepted) >= rounds * clients // 2   # real load (a sanity check of the test itself)
    assert tries > len(delivered)               # and the peer's 451s made the daemon retry
    assert integrity(daemon.queue_path) == "ok"
    assert pending_messages(daemon.queue_path) == 0


# --------------------------------------------------------------------------- 2. disk full

def fill_disk(path: Path) -> None:
    """Take every free byte of the file system with one file (tmpfs: down to the page)."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 20, 65536, 4096, 512):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * chunk)
    assert _free_bytes(path.parent) == 0


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@pytest.mark.timeout(90)
async def test_disk_full_refuses_mail_delivers_the_queue_and_resumes(tmp_path):
    """The queue on a 4 MB tmpfs; the peer is blocked, so mail piles up until the disk
    is full: new mail gets 452 4.3.1 (or 451 4.3.0) and the daemon keeps running. Once
    the peer answers, the queue drains, which frees room, and acceptance resumes by
    itself. The same again when another process fills the disk to the last byte."""
    with mounted_tmpfs(tmp_path / "disk", "4m") as disk:
        unblocked = asyncio.Event()

        async def blocked(verb: str, arg: str, conn: object) -> str | None:
            if verb == "MAIL":
                await unblocked.wait()
            return None

        async with RecordingPeer("127.0.0.2", replies=blocked) as peer:
            doc = daemon_doc(tmp_path, free_port(), queue=disk / "queue.db",
                             smarthost=f"127.0.0.2:{peer.port}", timeouts={"command": "60s"})
            doc["limits"]["message_size"] = 200_000
            daemon = Daemon(tmp_path, doc)
            seqs = itertools.count()
            try:
                await daemon.started()
                # 1. Fill the disk: 4 clients, 30 kB messages, until three refusals.
                attempts: list[Attempt] = []

                async def fill() -> None:
                    while sum(a.outcome == "refused" for a in attempts) < 3:
                        attempts.append(await send_tagged(daemon.port, next(seqs), size=30_000))

                await asyncio.wait_for(asyncio.gather(*(fill() for _ in range(4))), 60)
                accepted = {a.seq for a in attempts if a.outcome == "accepted"}
                refusals = [a.reply for a in attempts if a.outcome == "refused"]
                assert accepted and refusals
                assert all(r.startswith(("452 4.3.1", "451 4.3.0")) for r in refusals), refusals
                assert not [a for a in attempts if a.outcome not in ("accepted", "refused")]
                assert daemon.proc.poll() is None
                print(f"disk full: {len(accepted)} messages of 30 kB queued on a 4 MB tmpfs, then "
                      f"{refusals[0]!r}; free space {_free_bytes(disk)} bytes")

                # 2. The peer answers again: the queue drains, which frees room in the queue.
                unblocked.set()
                await peer.wait_for(lambda: set(seq_counts(peer.messages)) >= accepted, 60)
                await wait_drained(daemon, 30)

                # 3. Acceptance has resumed by itself.
                later = [await send_tagged(daemon.port, next(seqs), size=30_000) for _ in range(20)]
                assert all(a.outcome == "accepted" for a in later), [a.reply for a in later]
                accepted |= {a.seq for a in later}
                await peer.wait_for(lambda: set(seq_counts(peer.messages)) >= accepted, 30)
                await wait_drained(daemon, 30)

                # 4. Someone else fills the disk to the last byte while five messages are
                #    being delivered: new mail is refused, the delivered five cannot be
                #    recorded yet -- the queue manager keeps their outcomes and tries again
                #    (it neither stops nor forgets them) -- and everything resumes once
                #    space is freed.
                unblocked.clear()
                mails = peer.counts["MAIL"]
                held = [await send_tagged(daemon.port, next(seqs), size=30_000) for _ in range(5)]
                assert all(a.outcome == "accepted" for a in held), [a.reply for a in held]
                accepted |= {a.seq for a in held}
                await peer.wait_for(lambda: peer.counts["MAIL"] >= mails + 5, 10)
                fill_disk(disk / "filler")
                full = [await send_tagged(daemon.port, next(seqs), size=30_000) for _ in range(3)]
                assert all(a.outcome == "refused" and a.reply.startswith(("452 4.3.1", "451 4.3.0"))
                           for a in full), [a.reply for a in full]
                unblocked.set()
                await peer.wait_for(lambda: set(seq_counts(peer.messages)) >= accepted, 30)
                await asyncio.sleep(1.0)
                assert daemon.proc.poll() is None
                assert "queue write failed while recording the delivery" in daemon.log_text()
                assert pending_messages(daemon.queue_path) == 5   # delivered, not yet recorded
                (disk / "filler").unlink()
                await wait_drained(daemon, 30)
                after = [await send_tagged(daemon.port, next(seqs), size=30_000) for _ in range(5)]
                assert all(a.outcome == "accepted" for a in after), [a.reply for a in after]
                accepted |= {a.seq for a in after}
                await peer.wait_for(lambda: set(seq_counts(peer.messages)) >= accepted, 30)
                await wait_drained(daemon, 30)
                assert await daemon.terminate() == 0
            finally:
                daemon.ensure_dead()
        assert integrity(daemon.queue_path) == "ok"
    delivered = seq_counts(peer.messages)
    assert set(delivered) >= accepted
    print(f"disk full: accepted={len(accepted)}, delivered={len(delivered)}, "
          f"duplicates={sum(delivered.values()) - len(delivered)}")


async def test_store_reserve_refuses_early_and_counts_pages_freed_inside_the_queue(tmp_path, monkeypatch):
    """The reserve without root: with little free space (faked) a message that would eat
    into the reserve is refused as disk full, before any write; pages freed inside the
    queue file by removed mail count as free again, though the file does not shrink."""
    store = SQLiteStore(tmp_path / "queue.db", reserve=100_000)
    await store.open()
    try:
        def message(n: int) -> NewMessage:
            return NewMessage(id=new_queue_id(), sender="a@lab.test", recipients=(Recipient("b@example.org"),),
                              data=tagged_body(n, 50_000), arrival=time.time(), client="127.0.0.1")

        first = [message(n) for n in range(10)]
        for m in first:
            await store.queue.enqueue(m)
        monkeypatch.setattr(store.engine, "free_space", lambda: 150_000)   # < reserve + 2 x 50 kB
        with pytest.raises(StoreError) as refused:
            await store.queue.enqueue(message(10))
        assert refused.value.disk_full
        assert await store.admin.count_recipients() == {"queued": 10}
        await store.admin.delete([m.id for m in first[:5]])          # as if delivered
        await store.queue.enqueue(message(11))                       # fits in the freed pages
        assert await store.admin.count_recipients() == {"queued": 6}
        assert await store.admin.integrity_check() == "ok"
    finally:
        await store.close()


@pytest.mark.timeout(30)
async def test_queue_manager_rides_out_failing_queue_writes(make_config):
    """Without root: claims and outcome writes that fail (as on a full disk) are tried
    again -- the queue manager neither stops nor forgets a delivery it made, so the
    message reaches the peer exactly once and leaves the queue."""
    async with RecordingPeer("127.0.0.2") as peer:
        config = make_config(delivery={"smarthost": f"127.0.0.2:{peer.port}", "tls": "none"})
        app = App(config, deliver=True)
        failures = {"claim": 2, "record_outcomes": 2}
        for name in failures:
            real = getattr(app.store.queue, name)

            async def failing(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
                if failures[_name]:
                    failures[_name] -= 1
                    raise StoreError("database or disk is full", disk_full=True)
                return await _real(*args, **kwargs)

            setattr(app.store.queue, name, failing)
        await app.start()
        try:
            assert (await send_tagged(listener_port(config), 1)).outcome == "accepted"
            await peer.wait_for_messages(1, 10)
            await peer.wait_for(lambda: pending_messages(config.queue.path) == 0, 10)
            assert app.delivery is not None and app.delivery.healthy
        finally:
            await app.shutdown()
    assert failures == {"claim": 0, "record_outcomes": 0}
    assert seq_counts(peer.messages) == {1: 1}


# --------------------------------------------------------------------------- 3. misbehaving next hops

# domain -> (next hop address, what its conversation does, the deferral reason it must give)
BAD_HOPS = {
    "silent.test": ("127.0.0.2", silent,
                    r"451 4\.4\.2 conversation with {h}\[{h}\] timed out while receiving the initial server greeting"),
    "tarpit.test": ("127.0.0.3", one_byte_a_second,
                    r"451 4\.4\.2 conversation with {h}\[{h}\] timed out while receiving the initial server greeting"),
    "drop.test": ("127.0.0.4", "drop",
                  r"451 4\.4\.2 lost connection with {h}\[{h}\] while sending (message body|end of data.*)"),
    "garbage.test": ("127.0.0.5", garbage,
                     r"451 4\.5\.0 {h}\[{h}\] sent a malformed reply while receiving the initial server greeting: .*"),
    "busy.test": ("127.0.0.6", greet_then_421, r"421 4\.4\.2 busy\.test Error: timeout exceeded"),
}
IDLE_HOP = "127.0.0.7"     # idle.test: says 421 and hangs up on a cached, idle connection
COMMAND_TIMEOUT = 2.0      # delivery.timeouts.command in these tests (connect: 1s)


@contextlib.asynccontextmanager
async def bad_hops() -> AsyncIterator[dict[str, Any]]:
    """Every misbehaving next hop, listening; maps domain -> peer."""
    async with contextlib.AsyncExitStack() as stack:
        peers: dict[str, Any] = {}
        for domain, (host, behaviour, _) in BAD_HOPS.items():
            if behaviour == "drop":
                peer = RecordingPeer(host, drop_after_data_bytes=300)
            else:
                peer = BadPeer(host, behaviour)
            peers[domain] = await stack.enter_async_context(peer)
        peers["idle.test"] = await stack.enter_async_context(RecordingPeer(IDLE_HOP, idle_421_after=0.3))
        yield peers


def bad_hop_delivery(peers: dict[str, Any]) -> dict[str, Any]:
    return {
        "routes": {domain: f"{peer.host}:{peer.port}" for domain, peer in peers.items()},
        "retry": {"min_backoff": "5m", "max_backoff": "1h"},    # one attempt each
        "connection_cache": {"idle_timeout": "5s"},
        "timeouts": {"connect": "1s", "command": f"{COMMAND_TIMEOUT}s"},
    }


def bad_hops_idle(peers: dict[str, Any]) -> bool:
    """No connection to any misbehaving hop is still open (we hung up on every one)."""
    return all(p.open == 0 if isinstance(p, BadPeer) else all(c.finished for c in p.connections)
               for p in peers.values())


async def watch_deferrals(queue_path: str, ids: dict[str, str], t0: float, timeout: float) -> dict[str, float]:
    """Seconds from t0 until each queue id's recipient was deferred."""
    when: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(when) < len(ids):
        assert time.monotonic() < deadline, f"not deferred in time: {set(ids) - set(when)}"
        for message_id, _, state, _, _ in recipient_rows(queue_path):
            domain = ids.get(message_id)
            if domain is not None and domain not in when and state != "active" and state != "queued":
                when[domain] = time.monotonic() - t0
        await asyncio.sleep(0.02)
    return when


async def submit_to_bad_hops(port: int) -> tuple[dict[str, str], float]:
    """One message per misbehaving domain, at once; queue id -> domain."""
    t0 = time.monotonic()
    attempts = await asyncio.gather(*(send_tagged(port, i, rcpt=f"user@{domain}", size=20_000)
                                      for i, domain in enumerate(BAD_HOPS)))
    assert all(a.outcome == "accepted" for a in attempts), [a.reply for a in attempts]
    return {a.queue_id: domain for a, domain in zip(attempts, BAD_HOPS, strict=True)}, t0


def check_deferrals(queue_path: str, ids: dict[str, str], when: dict[str, float]) -> None:
    rows = {message_id: (state, attempts, error) for message_id, _, state, attempts, error
            in recipient_rows(queue_path)}
    for message_id, domain in ids.items():
        host, behaviour, reason = BAD_HOPS[domain]
        state, attempts, error = rows[message_id]
        assert (state, attempts) == ("deferred", 1), (domain, state, attempts, error)
        assert re.fullmatch(reason.format(h=re.escape(host)), error), (domain, error)
        # Within the configured timeouts: a silent or crawling peer costs one command
        # timeout, the others fail at once.
        slow = behaviour in (silent, one_byte_a_second)
        assert when[domain] < (COMMAND_TIMEOUT + 1.5 if slow else 1.5), (domain, when[domain])
        if slow:
            assert when[domain] >= COMMAND_TIMEOUT - 0.1, (domain, when[domain])


async def idle_421_then_new_connection(port: int, peer: RecordingPeer) -> None:
    """A cached connection that gets '421' while idle is dropped, and the next message goes
    over a new connection without a deferral."""
    assert (await send_tagged(port, 100, rcpt="user@idle.test")).outcome == "accepted"
    await peer.wait_for_messages(1, 5)
    await peer.wait_for(lambda: peer.connections[0].closed_by_peer and peer.connections[0].finished, 5)
    assert (await send_tagged(port, 101, rcpt="user@idle.test")).outcome == "accepted"
    await peer.wait_for_messages(2, 5)
    assert len(peer.connections) == 2
    # The peer hung up on the first (its 421): we must not have sent anything after the 421.
    assert peer.connections[0].verbs == ["EHLO", "MAIL", "RCPT", "DATA"]


@pytest.mark.timeout(60)
async def test_misbehaving_next_hops_defer_with_a_clear_reason(tmp_path):
    """The real daemon against a silent peer, a tar pit (one byte a second), a peer that
    hangs up in the middle of DATA, one that sends garbage and one that says 421 before
    we speak: each message is deferred once, with a reason naming what happened, within
    the configured timeouts; and a 421 on an idle cached connection costs nothing."""
    async with bad_hops() as peers:
        daemon = Daemon(tmp_path, daemon_doc(tmp_path, free_port(), **bad_hop_delivery(peers)))
        try:
            await daemon.started()
            ids, t0 = await submit_to_bad_hops(daemon.port)
            when = await watch_deferrals(daemon.queue_path, ids, t0, COMMAND_TIMEOUT + 10)
            check_deferrals(daemon.queue_path, ids, when)
            reasons = {ids[m]: error for m, _, _, _, error in recipient_rows(daemon.queue_path)}
            await idle_421_then_new_connection(daemon.port, peers["idle.test"])
            await asyncio.sleep(0.5)
            assert "@idle.test>" not in "".join(line for line in daemon.log_text().splitlines()
                                                 if "status=deferred" in line)
            assert await daemon.terminate() == 0
        finally:
            daemon.ensure_dead()
        await peers["idle.test"].wait_finished(5)
        assert bad_hops_idle(peers)
    for domain, t in sorted(when.items(), key=lambda item: item[1]):
        print(f"misbehaving next hop {domain}: deferred after {t:.2f}s: {reasons[domain]}")


@pytest.mark.timeout(60)
async def test_misbehaving_next_hops_leak_no_task_or_session(make_config):
    """The same faults in an in-process daemon: afterwards the event loop has exactly
    the tasks it had before, no session is cached or open, and shutdown leaves nothing."""

    def tasks() -> collections.Counter[str]:
        """The loop's live tasks by coroutine. Event.wait is left out: asyncio.wait_for()
        wraps the queue manager's sleep in a fresh task on every round."""
        return collections.Counter(
            t.get_coro().__qualname__ for t in asyncio.all_tasks()
            if t is not asyncio.current_task() and not t.done()
            and t.get_coro().__qualname__ != "Event.wait")

    async with bad_hops() as peers:
        config = make_config(delivery=bad_hop_delivery(peers))
        before = tasks()
        async with running(config, deliver=True) as app:
            await asyncio.sleep(0.2)
            idle = tasks()
            ids, t0 = await submit_to_bad_hops(listener_port(config))
            when = await watch_deferrals(config.queue.path, ids, t0, COMMAND_TIMEOUT + 10)
            check_deferrals(config.queue.path, ids, when)
            await idle_421_then_new_connection(listener_port(config), peers["idle.test"])
            # The second idle.test session is cached until the peer's 421 (0.3 s) drops it.
            deadline = time.monotonic() + 5
            while (tasks() != idle or app.pool.idle_count or not bad_hops_idle(peers)) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert tasks() == idle, (tasks(), idle)
            assert app.pool.idle_count == 0
            assert bad_hops_idle(peers)
            assert app.scheduler.in_flight == 0
        assert tasks() == before, (tasks(), before)
    print(f"misbehaving next hops, in-process: tasks while idle {dict(idle)}, none left over")


# --------------------------------------------------------------------------- 4. DNS down or slow

@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", ["down", "slow"])
async def test_dns_down_or_slow_defers_not_bounces(tmp_path, fault):
    """No DNS server at the configured address, or one that never answers: the
    message is deferred with 4.4.3 (and tried again), never bounced."""
    with FakeDNS(zones={"example.test": "TIMEOUT"}) as dns:
        if fault == "down":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind(("127.0.0.1", 0))
                dns_port = probe.getsockname()[1]   # closed again: nothing listens there
        else:
            dns_port = dns.port
        doc = daemon_doc(tmp_path, free_port(), dns={"nameservers": ["127.0.0.1"], "port": dns_port,
                                                     "timeout": "1s"},
                         retry={"min_backoff": "0.5s", "max_backoff": "1s"})
        daemon = Daemon(tmp_path, doc)
        try:
            await daemon.started()
            t0 = time.monotonic()
            attempt = await send_tagged(daemon.port, 1, rcpt="user@example.test")
            assert attempt.outcome == "accepted", attempt.reply
            deadline = time.monotonic() + 15
            while True:
                rows = recipient_rows(daemon.queue_path)
                if rows and rows[0][3] >= 2 and rows[0][2] == "deferred":
                    break
                assert time.monotonic() < deadline, rows
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - t0
            assert await daemon.terminate() == 0
        finally:
            daemon.ensure_dead()
        if fault == "slow":
            assert dns.count("example.test", "MX") >= 2
    [(message_id, _, state, attempts, error)] = recipient_rows(daemon.queue_path)
    assert message_id == attempt.queue_id and state == "deferred"
    assert error == ("451 4.4.3 Host or domain name not found. Name service error for name=example.test "
                     "type=MX: Host not found, try again")
    assert "status=bounced" not in daemon.log_text()
    assert pending_messages(daemon.queue_path) == 1   # no bounce was generated
    print(f"DNS {fault}: deferred with 4.4.3, {attempts} attempts in {elapsed:.1f}s")


# --------------------------------------------------------------------------- 5. SIGTERM under load

@pytest.mark.timeout(180 if LONG else 60)
async def test_sigterm_under_load_finishes_quits_and_resumes(tmp_path):
    """SIGTERM while 20 clients send and deliveries are in flight: every inbound
    transaction under way finishes with 250 (the others get 421), every outbound
    session ends with QUIT, the daemon exits 0 within the grace period, and after a
    restart everything accepted is delivered, exactly once."""
    rounds = 5 if LONG else 2
    clients = 20
    rng = random.Random(_seed())
    peer_rng = random.Random(rng.random())

    in_data = 0   # deliveries between their message data and our reply, right now

    async def slow_250(verb: str, arg: str, conn: object) -> str | None:
        nonlocal in_data
        if verb == END_OF_DATA:
            in_data += 1
            try:
                await asyncio.sleep(peer_rng.uniform(0.0, 0.2))   # deliveries stay in flight a while
            finally:
                in_data -= 1
        return None

    async with RecordingPeer("127.0.0.2", replies=slow_250) as peer:
        daemon = Daemon(tmp_path, daemon_doc(tmp_path, free_port(), smarthost=f"127.0.0.2:{peer.port}",
                                             connection_cache={"idle_timeout": "30s"},
                                             per_destination_concurrency=20))
        seqs = itertools.count()
        attempts: list[Attempt] = []
        stop_times: list[float] = []
        sigterms: list[float] = []
        outbound_in_flight = 0
        try:
            for _ in range(rounds):
                await daemon.started()
                stopping = asyncio.Event()

                async def client(stopping: asyncio.Event = stopping) -> None:   # this round's event
                    while not stopping.is_set():
                        attempt = await send_tagged(daemon.port, next(seqs), size=rng.choice([0, 5_000, 50_000]))
                        attempts.append(attempt)
                        if attempt.outcome != "accepted":
                            return

                tasks = [asyncio.create_task(client()) for _ in range(clients)]
                await asyncio.sleep(rng.uniform(0.5, 1.5))
                outbound_in_flight += in_data
                t0 = time.monotonic()
                sigterms.append(t0)
                assert await daemon.terminate(timeout=20) == 0
                stop_times.append(time.monotonic() - t0)
                stopping.set()
                await asyncio.gather(*tasks)
                # Every outbound session of this run has ended, each with QUIT.
                await peer.wait_finished(5)
            await daemon.started()
            await wait_drained(daemon, 60)
            assert await daemon.terminate() == 0
        finally:
            daemon.ensure_dead()
        await peer.wait_finished(5)

    not_quit = [c.transcript[-3:] for c in peer.connections if not c.verbs or c.verbs[-1] != "QUIT"]
    assert not_quit == []
    # Inbound: a transaction under way (MAIL accepted) always finished with 250; a client
    # that had its greeting and did not finish was told 421; a client may also have been
    # too late to be served at all (connection refused or closed before the greeting).
    unfinished = [a for a in attempts if a.mail_accepted and a.outcome != "accepted"]
    assert unfinished == [], [(a.seq, a.replies) for a in unfinished]
    untold = [a for a in attempts if a.greeted and a.outcome != "accepted"
              and not any(r.startswith("421 4.3.2") for r in a.replies)]
    assert untold == [], [(a.seq, a.outcome, a.replies) for a in untold]
    accepted = {a.seq for a in attempts if a.outcome == "accepted"}
    delivered = seq_counts(peer.messages)
    lost = sorted(accepted - set(delivered))
    duplicates = {seq: n for seq, n in delivered.items() if n > 1}
    told_421 = sum(1 for a in attempts if any(r.startswith("421") for r in a.replies))
    inbound_in_flight = sum(1 for a in attempts for t in sigterms
                            if a.mail_accepted and a.started < t < a.ended)
    print(f"SIGTERM under load: rounds={rounds}, transactions={len(attempts)}, accepted={len(accepted)}, "
          f"under way at SIGTERM: {inbound_in_flight} inbound transactions (all finished with 250), "
          f"{outbound_in_flight} outbound deliveries (all finished); told 421={told_421}, "
          f"outcomes={dict(collections.Counter(a.outcome for a in attempts))}, "
          f"outbound sessions={len(peer.connections)} (all ended with QUIT), "
          f"stop took {max(stop_times):.2f}s at most, lost={len(lost)}, duplicates={len(duplicates)}")
    assert lost == [] and duplicates == {}
    assert set(delivered) <= {a.seq for a in attempts}
    assert max(stop_times) < 10 + 3     # SHUTDOWN_GRACE, plus start-up slack
    assert integrity(daemon.queue_path) == "ok"

"""Issue 12: a full disk heals by itself, proved on the queue captured when it did not.

tests/data/diskfull-queue.db.xz (also ../shared/repro/ in development and CI, with
its README) is a queue that filled an 8 MiB tmpfs: 214 messages of 30 kB, every
one still pending after 27-28 refused attempts, and 5,919 deferral history rows
that had eaten the 1.5 x message_size reserve. On that disk the old queue manager
delivered 4-5 messages, recorded none and then did nothing more: a batch of five
outcomes (each removal wrote 157-210 kB to the WAL) did not fit in the ~565 kB
left, and the same batch was retried whole every 5 s, while new mail got 452 4.3.1.

Here the real `mta serve` runs on that file on an 8 MiB tmpfs (root only: the test
mounts it) with a recording peer as its smarthost. Every pending message must reach
the peer exactly once, the queue must end empty, and a new message must get 250.
The second test leaves less room, so that every batch must be split, and takes the
last byte for a while: /healthz must say so, and heal.

The captured file's own README says "214 messages, 210 of them still pending"; the
file itself has a pending recipient in all 214 (5 'active', 209 'deferred'), and
those are what the peer must receive.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.parser
import lzma
import re
import sqlite3
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from mta.daemon.main_process import App
from mta.errors import StoreError
from tests.support.daemon import ROOT, Daemon
from tests.support.faults import integrity, pending_messages, send_tagged
from tests.support.in_process import listener_port
from tests.support.ports import free_port
from tests.support.smtp_peer import RecordingPeer
from tests.support.tmpfs import free_bytes, mounted_tmpfs

CAPTURE = "diskfull-queue.db.xz"
# Our own copy first; the shared repro directory (development: /work/shared, CI:
# beside the clone) only if the copy is missing.
CAPTURES = (ROOT / "tests" / "data" / CAPTURE, ROOT.parent / "shared" / "repro" / CAPTURE,
            Path("/work/shared/repro") / CAPTURE)
X_SEQ = re.compile(rb"(?:^|\r\n)X-Seq: ([^\r\n]+)\r\n")


def _capture() -> Path:
    for path in CAPTURES:
        if path.exists():
            return path
    pytest.skip(f"{CAPTURE} not found")


def _expected(queue: Path) -> dict[str, str]:
    """X-Seq -> queue id of every message with a pending recipient in the captured queue."""
    db = sqlite3.connect(f"file:{queue}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT b.message_id, substr(b.data, 1, 2000) FROM bodies b WHERE EXISTS"
                          " (SELECT 1 FROM recipients r WHERE r.message_id = b.message_id"
                          " AND r.state IN ('queued', 'active', 'deferred'))").fetchall()
    finally:
        db.close()
    expected = {}
    for message_id, head in rows:
        seq = email.parser.BytesHeaderParser().parsebytes(bytes(head))["X-Seq"]
        assert seq and seq not in expected, (message_id, seq)
        expected[seq] = message_id
    return expected


def _seqs(messages: list) -> collections.Counter[str]:
    seen: collections.Counter[str] = collections.Counter()
    for message in messages:
        m = X_SEQ.search(message.data)
        assert m is not None, message.data[:200]
        seen[m.group(1).decode()] += 1
    return seen


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
        return reply.read().decode()


def _healthz(port: int) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _unpack(disk: Path) -> Path:
    queue = disk / "queue.db"
    with lzma.open(_capture()) as src, open(queue, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    return queue


def _daemon(tmp_path: Path, queue: Path, peer_port: int, metrics_port: int) -> Daemon:
    """The repro's configuration (shared/repro/README.md) on free ports. The messages
    arrived on 2026-12-02: a long max_lifetime keeps them from bouncing whenever the
    test runs."""
    return Daemon(tmp_path, {
        "hostname": "relay.lab.example",
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"}],
        "mynetworks": ["127.0.0.0/8"],
        "queue": {"path": str(queue)},
        "limits": {"message_size": "1MB"},
        "delivery": {"smarthost": f"127.0.0.2:{peer_port}", "tls": "none",
                     "retry": {"min_backoff": "200ms", "max_backoff": "1s", "max_lifetime": "3650d"}},
        "metrics": {"address": f"127.0.0.1:{metrics_port}"},
    })


def _fill(path: Path, leave: int = 0) -> None:
    """One file that takes all free space on the file system but ``leave`` bytes."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 20, 65536, 4096):
            with contextlib.suppress(OSError):
                while free_bytes(path.parent) - chunk >= leave:
                    f.write(b"\0" * chunk)
    assert leave <= free_bytes(path.parent) < leave + 4096 + 1, free_bytes(path.parent)


async def _drained(peer: RecordingPeer, queue: Path, expected: dict[str, str], timeout: float,
                   what: str, disk: Path, started: float) -> collections.Counter[str]:
    """Until the peer has every expected message and the queue is empty; prints the figures."""
    drained = False
    try:
        await peer.wait_for(lambda: set(_seqs(peer.messages)) >= set(expected)
                            and pending_messages(str(queue)) == 0, timeout)
        drained = True
    finally:
        print(f"{what}: {len(set(_seqs(peer.messages)) & set(expected))} of {len(expected)} delivered, "
              f"{pending_messages(str(queue))} message(s) left, drained={drained}, "
              f"{time.monotonic() - started:.1f}s, free now {free_bytes(disk)} bytes")
    return _seqs(peer.messages)


@pytest.mark.timeout(120)
async def test_captured_full_queue_drains_by_itself_and_acceptance_resumes(tmp_path):
    """The repro as captured: the old code delivered 5 messages, could not record them,
    and retried the same batch of five outcomes every 5 s until the timeout."""
    with mounted_tmpfs(tmp_path / "df", "8m") as disk:
        queue = _unpack(disk)
        expected = _expected(queue)
        assert len(expected) == 214
        free_before = free_bytes(disk)
        async with RecordingPeer("127.0.0.2") as peer:
            metrics_port = free_port()
            daemon = _daemon(tmp_path, queue, peer.port, metrics_port)
            started = time.monotonic()
            try:
                await daemon.started()
                delivered = await _drained(peer, queue, expected, 60,
                                           f"captured queue on an 8 MiB tmpfs ({free_before} bytes free)",
                                           disk, started)
                assert delivered == collections.Counter({seq: 1 for seq in expected})

                # Acceptance has resumed by itself: new mail gets 250 and is delivered.
                later = await send_tagged(daemon.port, 1, size=30_000)
                assert later.outcome == "accepted", later.replies
                await peer.wait_for(
                    lambda: pending_messages(str(queue)) == 0 and len(peer.messages) > len(delivered), 30)
                assert _healthz(metrics_port) == (200, "ok\n")
                assert await daemon.terminate() == 0
            finally:
                daemon.ensure_dead()
            assert integrity(str(queue)) == "ok"


LEAVE = 256 * 1024   # one removal (157-210 kB of WAL) fits; two together (~290 kB) do not


@pytest.mark.timeout(120)
async def test_outcomes_that_cannot_be_recorded_show_on_healthz_and_heal(tmp_path):
    """The captured queue with only 256 kB free: outcomes must be committed one by one.
    While five deliveries are at the peer, another file takes the last byte: their
    outcomes cannot be recorded, and /healthz says so (new mail refused with 452 alone
    is not a fault) (503, queue_storage, the free
    bytes) and mta_health_status{component="queue_storage"} is 0. Once the file is
    removed the queue drains -- every message exactly once -- and health is ok again."""
    with mounted_tmpfs(tmp_path / "df", "8m") as disk:
        queue = _unpack(disk)
        expected = _expected(queue)
        _fill(disk / "filler", leave=LEAVE)
        unblocked = asyncio.Event()

        async def blocked(verb: str, arg: str, conn: object) -> str | None:
            if verb == "MAIL":
                await unblocked.wait()
            return None

        async with RecordingPeer("127.0.0.2", replies=blocked) as peer:
            metrics_port = free_port()
            daemon = _daemon(tmp_path, queue, peer.port, metrics_port)
            started = time.monotonic()
            try:
                await daemon.started()
                await peer.wait_for(lambda: peer.counts["MAIL"] >= 5, 20)
                _fill(disk / "last-byte")
                refused = await send_tagged(daemon.port, 1, size=30_000)
                assert refused.outcome == "refused" and refused.reply.startswith("452 4.3.1"), refused.replies
                # Refusing new mail is back-pressure, not a fault: nothing has failed to record yet.
                assert _healthz(metrics_port) == (200, "ok\n")
                unblocked.set()

                async def unhealthy() -> tuple[int, str]:
                    while (answer := await asyncio.to_thread(_healthz, metrics_port))[0] == 200:
                        await asyncio.sleep(0.1)
                    return answer

                status, body = await asyncio.wait_for(unhealthy(), 20)
                assert status == 503
                assert re.fullmatch(rf"queue_storage: queue writes fail, disk full: \d+ bytes free in {disk}"
                                    r" \(reserve 1500000\)\n", body), body
                metrics = await asyncio.to_thread(_get, metrics_port, "/metrics")
                assert 'mta_health_status{component="queue_storage"} 0.0' in metrics
                assert pending_messages(str(queue)) == len(expected)   # delivered, not recorded

                (disk / "last-byte").unlink()
                delivered = await _drained(peer, queue, expected, 60,
                                           f"captured queue with {LEAVE} bytes free", disk, started)
                assert delivered == collections.Counter({seq: 1 for seq in expected})
                assert _healthz(metrics_port) == (200, "ok\n")
                log = daemon.log_text()
                assert "trying them one by one" in log   # batches were too big: split
                assert "health: queue_storage: recovered" in log
                assert await daemon.terminate() == 0
            finally:
                daemon.ensure_dead()
            assert integrity(str(queue)) == "ok"


@pytest.mark.timeout(30)
async def test_queue_storage_fault_lasts_while_an_outcome_cannot_be_recorded(make_config):
    """Without root: the delivery's outcome write fails three times as on a full disk
    (injected, as in test_faults.py). From the first failure until it commits, health
    has queue_storage with the free bytes; afterwards it is ok."""
    async with RecordingPeer("127.0.0.2") as peer:
        config = make_config(delivery={"smarthost": f"127.0.0.2:{peer.port}", "tls": "none",
                                       "retry": {"min_backoff": "200ms", "max_backoff": "1s"}})
        app = App(config, deliver=True)
        seen: list[dict[str, str]] = []   # the faults at each try of the outcome write
        real = app.store.queue.record_outcomes

        async def failing(*args: Any, **kwargs: Any) -> Any:
            seen.append(app.health.faults())
            if len(seen) <= 3:
                raise StoreError("database or disk is full", disk_full=True)
            return await real(*args, **kwargs)

        app.store.queue.record_outcomes = failing  # type: ignore[method-assign]
        await app.start()
        try:
            assert (await send_tagged(listener_port(config), 1)).outcome == "accepted"
            await peer.wait_for(lambda: pending_messages(config.queue.path) == 0, 20)
        finally:
            await app.shutdown()
    assert len(seen) == 4 and seen[0] == {}
    reason = re.compile(rf"queue writes fail, disk full: \d+ bytes free in {Path(config.queue.path).parent}"
                        rf" \(reserve {int(1.5 * config.limits.message_size)}\)")
    assert all(reason.fullmatch(s.get("queue_storage", "")) for s in seen[1:]), seen
    assert app.health.faults() == {}

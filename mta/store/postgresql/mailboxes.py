"""The lab mailboxes on PostgreSQL: what POP3 and `mta mailbox` read, on every node.

The same table and semantics as the SQLite backend (mta/store/sqlite/mailboxes.py):
a message is stored as POP3 sends it before byte-stuffing (CRLF line ends, ``size``
its octet count, RFC 1939 §5); its id is never reused (an identity column) and is
part of the UIDL; a maildrop lists in arrival order. Copies are written by
PostgreSQLQueue.record_outcomes, in the commit that marks their recipients delivered.

What several nodes add:

* RFC 1939 §8's maildrop lock must hold across nodes: it is a session-level advisory
  lock (``pg_try_advisory_lock``) on a connection of its own, opened for that POP3
  session and closed at its end. PostgreSQL gives the lock up with the connection,
  so a node that dies or loses the database cannot keep a maildrop locked (a killed
  process at once; a machine that died within about a minute: PgEngine.connect's
  keepalives).
* ``max_age`` pruning runs on one node at a time (PRUNE_LOCK, a transaction-level
  advisory lock: another node pruning meanwhile makes this round a no-op), and takes
  each maildrop's lock for its transaction, so it never removes mail from under a
  POP3 session of any node.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Collection, Sequence
from typing import Any

from mta.errors import StoreError
from mta.store.api import MailboxLock, MailboxSummary, MessageSummary, StoredMessage, mailbox_key
from mta.store.postgresql.engine import PgEngine, one_line
from mta.store.postgresql.schema import MIGRATION_LOCK

# pg_try_advisory_xact_lock's key for max_age pruning ("mta\0prun" as 8 bytes), next to
# schema.py's MIGRATION_LOCK in the one-bigint key space of advisory locks.
PRUNE_LOCK = 0x6D7461_00_7072756E
_FIXED_KEYS = (MIGRATION_LOCK, PRUNE_LOCK)


def maildrop_key(mailbox: str) -> int:
    """The advisory lock key of a maildrop: 8 bytes of BLAKE2b of its mailbox_key() as a
    signed 64-bit integer (PostgreSQL's bigint). Two mailboxes sharing a key (odds of
    2**-64 per pair) would only lock each other out; the fixed keys are stepped around."""
    digest = hashlib.blake2b(mailbox_key(mailbox).encode("utf-8"), digest_size=8, person=b"mta-maildrop").digest()
    key = int.from_bytes(digest, "big", signed=True)
    return key ^ 1 if key in _FIXED_KEYS else key


class PostgreSQLMailboxes:
    """mta.store.api.Mailboxes on PostgreSQL, shared by every node on the database."""

    def __init__(self, engine: PgEngine):
        self.engine = engine

    async def lock(self, mailbox: str) -> MailboxLock | None:
        """Lock the maildrop against every session of every node; None when one holds it.
        StoreError when the database cannot be reached (POP3 answers -ERR)."""
        key = maildrop_key(mailbox)
        conn = await self.engine.connect("mta pop3 lock")
        try:
            locked = await conn.fetchval("SELECT pg_try_advisory_lock($1)", key)
        except BaseException as exc:
            conn.terminate()
            if isinstance(exc, Exception):
                raise StoreError(one_line(exc)) from exc
            raise
        if not locked:
            await _close(conn)
            return None
        return _AdvisoryLock(conn, key)

    async def messages(self, mailbox: str) -> list[StoredMessage]:
        """The maildrop in arrival order (POP3 message numbers follow it)."""

        async def read(conn: Any) -> list[StoredMessage]:
            rows = await conn.fetch(
                "SELECT id, queue_id, size, received FROM mailbox_messages WHERE mailbox = $1"
                " ORDER BY received, id", mailbox_key(mailbox))
            return [StoredMessage(int(i), str(q), int(s), float(r)) for i, q, s, r in rows]

        return await self.engine.run(read)

    async def read(self, mailbox: str, message_id: int) -> bytes | None:
        """A message's bytes (CRLF line ends, not byte-stuffed); None if it is gone."""

        async def read(conn: Any) -> bytes | None:
            data = await conn.fetchval("SELECT data FROM mailbox_messages WHERE mailbox = $1 AND id = $2",
                                       mailbox_key(mailbox), message_id)
            return None if data is None else bytes(data)

        return await self.engine.run(read)

    async def delete(self, mailbox: str, message_ids: Sequence[int]) -> int:
        """Remove messages in one transaction (POP3's UPDATE state); returns how many were there."""
        ids = list(message_ids)
        if not ids:
            return 0

        async def delete(conn: Any) -> int:
            rows = await conn.fetch("DELETE FROM mailbox_messages WHERE mailbox = $1 AND id = ANY($2::bigint[])"
                                    " RETURNING 1", mailbox_key(mailbox), ids)
            return len(rows)

        return await self.engine.run(delete)

    async def purge(self, mailbox: str) -> int:
        """Remove every message of ``mailbox``."""

        async def purge(conn: Any) -> int:
            rows = await conn.fetch("DELETE FROM mailbox_messages WHERE mailbox = $1 RETURNING 1",
                                    mailbox_key(mailbox))
            return len(rows)

        return await self.engine.run(purge)

    async def prune_older_than(self, cutoff: float, *, skip: Collection[str] = ()) -> int:
        """Remove messages received before ``cutoff`` (mailboxes.max_age), except in
        maildrops a POP3 session holds, on any node (``skip``: this node's own): RFC 1939 §8
        gives the session exclusive access to its maildrop; the next round takes them.
        Returns 0 at once when another node is pruning."""
        skipped = [mailbox_key(m) for m in skip]

        async def prune(conn: Any) -> int:
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", PRUNE_LOCK):
                return 0   # another node is pruning right now
            old = [str(r[0]) for r in await conn.fetch(
                "SELECT DISTINCT mailbox FROM mailbox_messages WHERE received < $1", cutoff)]
            old = [m for m in old if m not in skipped]
            if not old:
                return 0
            # Each maildrop's lock, held to COMMIT: a login meanwhile waits for none of it
            # (it gets [IN-USE] for these few milliseconds), a session holding it is skipped.
            free = [str(r[0]) for r in await conn.fetch(
                "SELECT mailbox FROM unnest($1::text[], $2::bigint[]) AS u(mailbox, key)"
                " WHERE pg_try_advisory_xact_lock(key)", old, [maildrop_key(m) for m in old])]
            if not free:
                return 0
            rows = await conn.fetch("DELETE FROM mailbox_messages WHERE received < $1 AND mailbox = ANY($2::text[])"
                                    " RETURNING 1", cutoff, free)
            return len(rows)

        return await self.engine.run(prune)

    async def summaries(self) -> list[MailboxSummary]:
        """Every mailbox that holds mail, by name."""

        async def read(conn: Any) -> list[MailboxSummary]:
            rows = await conn.fetch(
                "SELECT mailbox, count(*), sum(size), min(received), max(received) FROM mailbox_messages"
                " GROUP BY mailbox ORDER BY mailbox")
            return [MailboxSummary(str(m), int(n), int(s), float(lo), float(hi)) for m, n, s, lo, hi in rows]

        return await self.engine.run(read)

    async def listing(self, mailbox: str) -> list[MessageSummary]:
        """One mailbox's messages with sender and subject, in arrival order (as POP3 numbers them)."""

        async def read(conn: Any) -> list[MessageSummary]:
            rows = await conn.fetch(
                "SELECT id, queue_id, size, received, sender, subject FROM mailbox_messages"
                " WHERE mailbox = $1 ORDER BY received, id", mailbox_key(mailbox))
            return [MessageSummary(int(i), str(q), int(s), float(r), str(f), str(t)) for i, q, s, r, f, t in rows]

        return await self.engine.run(read)


class _AdvisoryLock:
    """One maildrop's advisory lock and the connection holding it (one per POP3 session)."""

    def __init__(self, conn: Any, key: int):
        self._conn: Any = conn
        self._key = key

    async def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        # Closing the connection alone would give the lock up; the unlock says so at once,
        # even if the close is slow. A broken connection has lost the lock already.
        try:
            with contextlib.suppress(Exception):
                await conn.fetchval("SELECT pg_advisory_unlock($1)", self._key)
        finally:
            await _close(conn)


async def _close(conn: Any) -> None:
    """Close politely; if that fails or is cut short, drop the socket (the server ends
    the session, and with it its locks, either way)."""
    try:
        await conn.close(timeout=5.0)
    except Exception:
        conn.terminate()
    except BaseException:   # cancelled: still never leave the connection (and lock) behind
        conn.terminate()
        raise

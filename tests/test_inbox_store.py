"""The lab inbox on both backends (a real SQLite queue file, a database of a private
PostgreSQL cluster), through the paths that change it: Queue.record_outcomes with
local delivery's copies, the Mailboxes that POP3 and `mta mailbox` use, and the
Inbox itself (mta/store/sqlite/inbox.py and entries.py with the triggers of SQLite
schema version 6; mta/store/postgresql/inbox.py and entries.py with those of
PostgreSQL schema version 2). The SQLite file's own upgrade and repair are at the end;
PostgreSQL's upgrade and several nodes are in test_postgresql_inbox.py."""

from __future__ import annotations

import datetime
import sqlite3
import time
from typing import Any

import pytest

from mta.inbox.model import Address, InboxChange
from mta.inbox.raw import entry_raw
from mta.inbox.search import parse_query
from mta.mailbox.local import delivery_headers
from mta.model import NewMessage, RcptState, Recipient
from mta.store.api import RecipientUpdate
from mta.store.sqlite.repair import repair
from mta.store.sqlite.schema import MIGRATIONS, SCHEMA_VERSION, create_schema, statements
from mta.store.sqlite.store import SQLiteStore
from tests.support.backends import QueueBackend
from tests.support.inbox import SENDER, claim_all, copy, deliver, message

pytestmark = pytest.mark.timeout(60)

@pytest.fixture
def store(store_backend: QueueBackend) -> QueueBackend:
    """The queue, its mailboxes and its inbox on each backend in turn."""
    return store_backend


def ids(page) -> list[str]:
    return [e.id for e in page.entries]


async def search(store: Any, query: str, **kw) -> list[str]:
    return ids(await store.inbox.page(parse_query(query), **kw))


# --------------------------------------------------------------------------- entries and copies


async def test_one_entry_for_a_message_delivered_to_two_mailboxes_in_one_commit(store):
    data = message("Report ready", cc="Carol <carol@x.test>", attachment=True)
    arrival = await deliver(store, "Q00000000001", data, ["alice@lab.test", "Bob@Lab.Test"])
    page = await store.inbox.page()
    assert (page.total, page.unread, page.matched, page.matched_unread, page.tags) == (1, 1, 1, 1, [])
    [entry] = page.entries
    assert entry.id == entry.queue_id == "Q00000000001"
    assert entry.created == arrival and not entry.read and entry.tags == ()
    assert entry.mailboxes == ("alice@lab.test", "bob@lab.test")
    s = entry.summary
    assert s.subject == "Report ready" and s.from_ == Address("App", "app@example.test")
    assert s.to == (Address("", "alice@lab.test"),) and s.cc == (Address("Carol", "carol@x.test"),)
    assert s.message_id == "m1@example.test" and s.attachments == 1
    assert s.date == datetime.datetime(2024, 1, 2, 10, tzinfo=datetime.UTC).timestamp()
    assert s.snippet == "the body text"
    # The size is of what the API serves: the message with Return-Path, without the per-mailbox lines.
    served = f"Return-Path: <{SENDER}>\r\n".encode() + data
    assert entry.size == len(served)
    raw = await store.inbox.raw("Q00000000001")
    assert raw is not None and entry_raw(raw) == served
    assert await store.inbox.entry("Q00000000001") == entry
    assert await store.inbox.changes_since(0) == [InboxChange(1, "new", "Q00000000001")]
    assert await store.inbox.last_change() == 1


async def test_copies_of_one_message_delivered_in_two_attempts_share_the_entry(store):
    data = message()
    arrival = time.time()
    await store.queue.enqueue(NewMessage(id="Q00000000002", sender=SENDER, data=data, arrival=arrival,
                                         recipients=(Recipient("alice@lab.test"), Recipient("bob@lab.test"))))
    await claim_all(store)
    delivered = RecipientUpdate(0, RcptState.DELIVERED, 1, 0.0, None)
    deferred = RecipientUpdate(1, RcptState.DEFERRED, 1, time.time() + 60, "452 4.2.2 mailbox full")
    assert not await store.queue.record_outcomes("Q00000000002", [delivered, deferred], time.time(),
                                                 mailbox_copies=[copy("alice@lab.test", "Q00000000002", data, arrival)])
    assert [e.mailboxes for e in (await store.inbox.page()).entries] == [("alice@lab.test",)]
    # The second attempt's copy (its store parses it itself: no summary) joins the same entry.
    await claim_all(store)
    later = RecipientUpdate(1, RcptState.DELIVERED, 2, 0.0, None)
    assert await store.queue.record_outcomes(
        "Q00000000002", [later], time.time(),
        mailbox_copies=[copy("bob@lab.test", "Q00000000002", data, arrival, with_summary=False)])
    page = await store.inbox.page()
    assert page.total == 1 and page.entries[0].mailboxes == ("alice@lab.test", "bob@lab.test")
    assert [c.kind for c in await store.inbox.changes_since(0)] == ["new"]


async def test_entry_stays_while_a_copy_remains_and_goes_with_the_last(store):
    await deliver(store, "Q00000000003", message(), ["alice@lab.test", "bob@lab.test"])
    # POP3's DELE + QUIT in alice's maildrop: bob still has it.
    [alice_copy] = await store.mailboxes.messages("alice@lab.test")
    assert await store.mailboxes.delete("alice@lab.test", [alice_copy.id]) == 1
    [entry] = (await store.inbox.page()).entries
    assert entry.mailboxes == ("bob@lab.test",)
    raw = await store.inbox.raw(entry.id)
    assert raw is not None and b"Delivered-To: bob@lab.test" in raw
    [bob_copy] = await store.mailboxes.messages("bob@lab.test")
    assert await store.mailboxes.delete("bob@lab.test", [bob_copy.id]) == 1
    assert (await store.inbox.page()).total == 0
    assert await store.inbox.entry(entry.id) is None and await store.inbox.raw(entry.id) is None
    assert [(c.kind, c.id) for c in await store.inbox.changes_since(0)] == [("new", entry.id), ("delete", entry.id)]
    for table in ("inbox", "inbox_text", "inbox_tags", "mailbox_messages"):   # nothing of it is left behind
        assert await store.query(f"SELECT count(*) FROM {table}") == [(0,)], table


async def test_purge_prune_and_max_messages_remove_entries_with_their_last_copies(store):
    old = time.time() - 7200
    await deliver(store, "Q00000000010", message("old"), ["alice@lab.test"], arrival=old)
    await deliver(store, "Q00000000011", message("both"), ["alice@lab.test", "bob@lab.test"])
    await deliver(store, "Q00000000012", message("carol 1"), ["carol@lab.test"], max_messages=1)
    await deliver(store, "Q00000000013", message("carol 2"), ["carol@lab.test"], max_messages=1)   # prunes carol 1
    assert ids(await store.inbox.page()) == ["Q00000000013", "Q00000000011", "Q00000000010"]
    assert await store.mailboxes.prune_older_than(time.time() - 3600) == 1    # mailboxes.max_age
    assert ids(await store.inbox.page()) == ["Q00000000013", "Q00000000011"]
    assert await store.mailboxes.purge("alice@lab.test") == 1                  # `mta mailbox purge`
    assert ids(await store.inbox.page()) == ["Q00000000013", "Q00000000011"]   # bob still has it
    assert await store.mailboxes.purge("bob@lab.test") == 1
    assert ids(await store.inbox.page()) == ["Q00000000013"]
    deleted = [c.id for c in await store.inbox.changes_since(0) if c.kind == "delete"]
    assert deleted == ["Q00000000012", "Q00000000010", "Q00000000011"]


async def test_inbox_delete_removes_every_copy(store):
    await deliver(store, "Q00000000020", message("one"), ["alice@lab.test", "bob@lab.test"])
    await deliver(store, "Q00000000021", message("two"), ["alice@lab.test"])
    await deliver(store, "Q00000000022", message("three"), ["bob@lab.test"])
    assert await store.inbox.delete(["Q00000000020", "NOSUCH"]) == ["Q00000000020"]
    assert [m.queue_id for m in await store.mailboxes.messages("alice@lab.test")] == ["Q00000000021"]
    assert [m.queue_id for m in await store.mailboxes.messages("bob@lab.test")] == ["Q00000000022"]
    assert await store.inbox.delete(None, parse_query("subject:two")) == ["Q00000000021"]
    assert await store.mailboxes.messages("alice@lab.test") == []
    assert await store.inbox.delete([]) == []
    assert await store.inbox.delete(None) == ["Q00000000022"]   # all
    assert await store.mailboxes.summaries() == []
    changes = await store.inbox.changes_since(3)
    assert [(c.kind, c.id) for c in changes] == [
        ("delete", "Q00000000020"), ("delete", "Q00000000021"), ("delete", "Q00000000022")]
    assert await store.inbox.changes_since(changes[-1].seq) == []


async def test_read_unread_and_counts(store):
    for n in range(4):
        await deliver(store, f"Q0000000003{n}", message(f"m{n}", to="alice@lab.test" if n % 2 else "bob@lab.test"),
                      ["alice@lab.test"])
    assert await store.inbox.set_read(["Q00000000030", "Q00000000031"], True) == 2
    assert await store.inbox.set_read(["Q00000000030"], True) == 0     # already read
    page = await store.inbox.page()
    assert (page.total, page.unread) == (4, 2)
    assert [e.read for e in page.entries] == [False, False, True, True]
    assert await search(store, "is:read") == ["Q00000000031", "Q00000000030"]
    assert await search(store, "-is:read") == await search(store, "is:unread") == ["Q00000000033", "Q00000000032"]
    page = await store.inbox.page(parse_query("to:alice is:unread"))
    assert (page.total, page.unread, page.matched, page.matched_unread) == (4, 2, 1, 1)
    assert await store.inbox.set_read(None, True, parse_query("to:alice")) == 1   # Q..33
    assert await store.inbox.set_read(None, False) == 3                          # all
    assert (await store.inbox.page()).unread == 4
    kinds = [(c.kind, c.id) for c in await store.inbox.changes_since(4)]
    assert kinds[:3] == [("read", "Q00000000030"), ("read", "Q00000000031"), ("read", "Q00000000033")]
    assert sorted(kinds[3:]) == [("unread", "Q00000000030"), ("unread", "Q00000000031"), ("unread", "Q00000000033")]


async def test_tags(store):
    for n in range(3):
        await deliver(store, f"Q0000000004{n}", message(f"m{n}"), ["alice@lab.test"])
    assert await store.inbox.set_tags(["Q00000000040", "Q00000000041", "NOSUCH"], ["urgent", "CI", "urgent"]) == 2
    assert await store.inbox.set_tags(["Q00000000041"], ["CI"]) == 1
    page = await store.inbox.page()
    assert page.tags == ["CI", "urgent"]
    assert {e.id: e.tags for e in page.entries} == {
        "Q00000000042": (), "Q00000000041": ("CI",), "Q00000000040": ("CI", "urgent")}
    assert await search(store, "tag:urgent") == ["Q00000000040"]
    assert await search(store, "tag:ci") == ["Q00000000041", "Q00000000040"]
    assert await search(store, "-tag:urgent") == ["Q00000000042", "Q00000000041"]
    assert await search(store, "is:tagged") == ["Q00000000041", "Q00000000040"]
    assert await search(store, "!is:tagged") == ["Q00000000042"]
    assert await store.inbox.set_tags(["Q00000000040", "Q00000000041"], []) == 2
    assert (await store.inbox.page()).tags == []


async def test_paging_newest_first(store):
    base = time.time() - 1000
    for n in range(120):
        await deliver(store, f"Q{n:011d}", message(f"m{n}", body=f"body {n}\n"), ["alice@lab.test"], arrival=base + n)
    page = await store.inbox.page(start=50, limit=50)
    assert ids(page) == [f"Q{n:011d}" for n in range(69, 19, -1)]
    assert (page.total, page.matched) == (120, 120)
    assert ids(await store.inbox.page(start=110, limit=50)) == [f"Q{n:011d}" for n in range(9, -1, -1)]
    assert ids(await store.inbox.page(start=200)) == []
    assert ids(await store.inbox.page(limit=0)) == []
    # A search pages the same way; its counts are of the matches.
    page = await store.inbox.page(parse_query('"body 1"'), start=5, limit=5)   # body 1, 10-19, 100-119
    assert ids(page) == [f"Q{n:011d}" for n in (114, 113, 112, 111, 110)]
    assert (page.total, page.matched, page.matched_unread) == (120, 31, 31)
    entries = await store.inbox.entries(["Q00000000003", "Q00000000100", "NOSUCH", "Q00000000003"])
    assert [e.id for e in entries] == ["Q00000000100", "Q00000000003"]


async def test_each_search_field_and_its_negation(store):
    now = time.time()
    await deliver(store, "QA0000000001", message(
        "Invoice #1 (draft)", from_="Billing <billing@shop.test>", to="Alice <alice@lab.test>",
        cc="Carol <carol@x.test>", bcc="audit@x.test", reply_to="Help Desk <help@shop.test>",
        message_id="<inv-1@shop.test>", body="Please pay 100% of the amount_due.\n", attachment=True),
        ["alice@lab.test"], arrival=now - 86400 * 10)
    await deliver(store, "QB0000000001", message(
        "Welcome, Bob", from_="Service <noreply@service.test>", to="Bob Été <bob@lab.test>",
        message_id="<welcome-9@service.test>", body="Hello Bob, your account is ready.\n" + "x" * 20_000),
        ["bob@lab.test"], arrival=now)
    both, a, b = ["QB0000000001", "QA0000000001"], ["QA0000000001"], ["QB0000000001"]
    cases = {
        "": both, "invoice": a, "-invoice": b, "!invoice": b, '"pay 100%"': a, "100%": a, "amount_due": a,
        "amount%due": [], "amount_due -draft": [], '"your account"': b, "ACCOUNT": b,
        "to:alice": a, "to:\"Bob Été\"": b, "to:bob été": b, "to:ÉTÉ": b, "-to:alice": b,
        "from:billing": a, "from:service.test": b, "-from:billing": b,
        "cc:carol": a, "cc:x.test": a, "-cc:carol": b,
        "bcc:audit": a, "-bcc:audit": b,
        "reply-to:help": a, "reply-to:\"help desk\"": a, "-reply-to:help": b,
        "addressed:carol": a, "addressed:noreply": b, "addressed:lab.test": both,
        "subject:invoice": a, "subject:\"#1 (draft)\"": a, "subject:welcome": b, "subject:WELCOME,": b,
        "-subject:welcome": a, "subject:nothing": [],
        "message-id:inv-1": a, "message-id:<welcome-9@service.test>": b, "-message-id:inv": b,
        "has:attachment": a, "-has:attachments": b,
        "larger:10k": b, "smaller:10k": a, "-larger:10k": a,
        f"after:{datetime.date.fromtimestamp(now - 86400).isoformat()}": b,
        f"before:{datetime.date.fromtimestamp(now - 86400).isoformat()}": a,
        f"-before:{datetime.date.fromtimestamp(now - 86400).isoformat()}": b,
        "mailbox:alice@lab.test": a, "mailbox:BOB@lab.test": b, "-mailbox:bob@lab.test": a, "mailbox:bob": [],
        "is:unread invoice": a, "is:read": [],
    }
    found = {query: await search(store, query) for query in cases}
    assert found == cases


async def test_mailbox_filter_narrows_the_list_and_its_counts(store):
    await deliver(store, "Q00000000050", message("to both"), ["alice@lab.test", "bob@lab.test"])
    await deliver(store, "Q00000000051", message("to alice"), ["alice@lab.test"])
    await deliver(store, "Q00000000052", message("to bob"), ["bob@lab.test"])
    await store.inbox.set_read(["Q00000000051"], True)
    page = await store.inbox.page(mailbox="Alice@Lab.Test")
    assert ids(page) == ["Q00000000051", "Q00000000050"]
    assert (page.total, page.unread, page.matched, page.matched_unread) == (2, 1, 2, 1)
    page = await store.inbox.page(mailbox="alice@lab.test", start=1, limit=1)
    assert ids(page) == ["Q00000000050"] and (page.total, page.unread) == (2, 1)
    page = await store.inbox.page(parse_query("subject:to"), mailbox="bob@lab.test")
    assert ids(page) == ["Q00000000052", "Q00000000050"] and (page.total, page.unread, page.matched) == (2, 2, 2)
    page = await store.inbox.page(parse_query("is:read"), mailbox="bob@lab.test")
    assert ids(page) == [] and (page.total, page.matched) == (2, 0)
    page = await store.inbox.page(mailbox="nobody@lab.test")
    assert (page.entries, page.total, page.unread) == ([], 0, 0)


async def test_queue_id_reused_by_a_later_message_gets_a_suffix(store):
    first = await deliver(store, "Q00000000060", message("first"), ["alice@lab.test"], arrival=time.time() - 5)
    # Queue ids wrap (mta.store.api.new_queue_id): the same id, arrived later, is another message.
    await deliver(store, "Q00000000060", message("second"), ["alice@lab.test"])
    await deliver(store, "Q00000000060", message("third"), ["bob@lab.test"])
    page = await store.inbox.page()
    assert [(e.id, e.queue_id, e.summary.subject) for e in page.entries] == [
        ("Q00000000060-3", "Q00000000060", "third"), ("Q00000000060-2", "Q00000000060", "second"),
        ("Q00000000060", "Q00000000060", "first")]
    assert page.entries[-1].created == first
    raw = await store.inbox.raw("Q00000000060-2")
    assert raw is not None and b"Subject: second" in raw
    await store.inbox.delete(["Q00000000060"])
    assert [m.queue_id for m in await store.mailboxes.messages("alice@lab.test")] == ["Q00000000060"]
    assert ids(await store.inbox.page()) == ["Q00000000060-3", "Q00000000060-2"]


async def test_search_field_values_are_escaped_in_like(store):
    await deliver(store, "Q00000000070", message("50% off_now"), ["alice@lab.test"])
    await deliver(store, "Q00000000071", message("500 offXnow C:\\temp"), ["alice@lab.test"])
    assert await search(store, "subject:50%") == ["Q00000000070"]
    assert await search(store, "subject:off_now") == ["Q00000000070"]
    assert await search(store, "subject:c:\\t") == ["Q00000000071"]
    assert await search(store, "subject:c:\\%") == []


async def test_change_log_is_bounded(store):
    await deliver(store, "Q00000000080", message(), ["alice@lab.test"])
    # 10,050 read/unread changes in one transaction, each its own statement.
    if store.name == "sqlite":
        await store.execute("".join(f"UPDATE inbox SET read = {int(n % 2 == 0)};" for n in range(10_050)))
    else:   # the triggers' logging function itself: 10,050 UPDATEs of one row in one PostgreSQL
        # transaction would walk ever longer chains of its row versions (quadratic)
        await store.execute("DO $$ BEGIN FOR n IN 0..10049 LOOP"
                            " PERFORM inbox_log(ARRAY[CASE WHEN n % 2 = 0 THEN 'read' ELSE 'unread' END],"
                            " ARRAY['Q00000000080']); END LOOP; END $$")
    assert await store.inbox.last_change() == 10_051
    changes = await store.inbox.changes_since(0, limit=20_000)
    assert len(changes) == 10_000 and changes[0].seq == 10_052 - 10_000 and changes[-1].seq == 10_051


async def test_changes_older_than_an_hour_are_dropped(store):
    await deliver(store, "Q00000000090", message(), ["alice@lab.test"])
    await store.execute("UPDATE inbox_changes SET time = time - 7200")
    await store.inbox.set_read(["Q00000000090"], True)
    assert [c.kind for c in await store.inbox.changes_since(0)] == ["read"]


# --------------------------------------------------------------------------- upgrade


async def test_version_5_file_gets_entries_for_its_copies(tmp_path):
    path = tmp_path / "queue.db"
    one, two = message("one", attachment=True), message("two", from_="Other <o@x.test>")
    with sqlite3.connect(path) as db:
        for version, script in enumerate(MIGRATIONS[:5], start=1):
            for statement in statements(script):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {version}")
        rows = [("alice@lab.test", "QOLD00000001", 1000.0, one), ("bob@lab.test", "QOLD00000001", 1000.0, one),
                ("alice@lab.test", "QOLD00000002", 2000.0, two)]
        for mailbox, queue_id, received, data in rows:
            copy_data = delivery_headers(SENDER, mailbox, None) + data
            db.execute("INSERT INTO mailbox_messages (mailbox, queue_id, received, sender, subject, size, data)"
                       " VALUES (?,?,?,?,?,?,?)", (mailbox, queue_id, received, SENDER, "", len(copy_data), copy_data))
    store = SQLiteStore(path)
    await store.open()
    try:
        page = await store.inbox.page()
        assert [(e.id, e.created, e.mailboxes, e.summary.subject, e.summary.attachments) for e in page.entries] == [
            ("QOLD00000002", 2000.0, ("alice@lab.test",), "two", 0),
            ("QOLD00000001", 1000.0, ("alice@lab.test", "bob@lab.test"), "one", 1)]
        assert page.entries[0].summary.from_ == Address("Other", "o@x.test")
        assert page.entries[1].size == len(f"Return-Path: <{SENDER}>\r\n") + len(one)
        assert await search(store, "from:other") == ["QOLD00000002"]
        assert await search(store, "body text") == ["QOLD00000002", "QOLD00000001"]
        assert await store.inbox.changes_since(0) == []   # the back-fill is not news
        # And the upgraded file behaves: POP3 deletes bob's copy, then alice's.
        [bob] = await store.mailboxes.messages("bob@lab.test")
        await store.mailboxes.delete("bob@lab.test", [bob.id])
        assert len((await store.inbox.page()).entries) == 2
        await store.mailboxes.purge("alice@lab.test")
        assert (await store.inbox.page()).total == 0
        assert [c.kind for c in await store.inbox.changes_since(0)] == ["delete", "delete"]
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


# --------------------------------------------------------------------------- the served bytes


def test_entry_raw_drops_only_local_deliverys_per_mailbox_lines():
    body = b"Delivered-To: earlier@hop.test\r\nSubject: x\r\n\r\nhi\r\n"
    stored = delivery_headers("s@x.test", "alice@lab.test", "rfc822;Alias@lab.test") + body
    assert entry_raw(stored) == b"Return-Path: <s@x.test>\r\n" + body
    assert entry_raw(body) == body
    assert entry_raw(b"") == b""


# --------------------------------------------------------------------------- `mta queue repair`


async def test_repair_carries_the_inbox(tmp_path):
    path = tmp_path / "queue.db"
    store = SQLiteStore(path)
    await store.open()
    await deliver(store, "Q00000000100", message("kept"), ["alice@lab.test", "bob@lab.test"])
    await deliver(store, "Q00000000101", message("entry lost"), ["alice@lab.test"])
    await store.inbox.set_read(["Q00000000100"], True)
    await store.inbox.set_tags(["Q00000000100"], ["ci"])
    seq = await store.inbox.last_change()
    await store.close()
    with sqlite3.connect(path) as db:   # an entry row and its text lost, its copy not
        db.execute("DROP TRIGGER inbox_removed")
        db.execute("DELETE FROM inbox WHERE id = 'Q00000000101'")
        db.execute("DELETE FROM inbox_text WHERE no NOT IN (SELECT no FROM inbox)")
    repaired = tmp_path / "repaired.db"
    report = repair(path, repaired, create_schema)
    assert report.mailbox_messages == 3 and report.lost == []
    store = SQLiteStore(repaired)
    await store.open()
    try:
        page = await store.inbox.page()
        assert [(e.id, e.read, e.tags, e.mailboxes) for e in page.entries] == [
            ("Q00000000101", False, (), ("alice@lab.test",)),
            ("Q00000000100", True, ("ci",), ("alice@lab.test", "bob@lab.test"))]
        assert await search(store, "lost") == ["Q00000000101"]
        assert await store.inbox.changes_since(0) == []
        assert await store.inbox.last_change() == seq   # an events client's position stays valid
        await store.inbox.delete(["Q00000000100"])
        assert [c.seq for c in await store.inbox.changes_since(seq)] == [seq + 1]
        assert [m.queue_id for m in await store.mailboxes.messages("bob@lab.test")] == []
    finally:
        await store.close()

"""Issue 12 part 5: a users file that cannot be read is a temporary failure, never a bounce.

Against a real `mta serve` (a subprocess with its delivery child): RCPT gets
451 4.3.0, mail already queued for a lab mailbox is deferred (and delivered once
the file is fixed), AUTH gets 454 4.7.0, POP3 login [SYS/TEMP], /healthz answers
503 naming the file, and the log names the file and the line. A bad edit after a
good start keeps the good copy in use. `mta check-config` reports the bad line.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import poplib
import smtplib
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mta.health import Health
from mta.model import NewMessage, Recipient
from mta.passwords import UsersFile, UsersFileError, UsersFileUnavailable, load_users
from mta.store.api import new_queue_id
from mta.store.sqlite.store import SQLiteStore
from tests.support.daemon import Daemon, mta_command, subprocess_env
from tests.support.ports import free_port
from tests.support.users import write_users

MAILBOXES = {"alice@lab.test": "alice pw", "bob@lab.test": "bob pw"}
AUTH = {"submitter": "sub pw"}
BAD_LINE = b"caf\xe9@lab.test:scrypt$16384$8$1$AAAA$AAAA\n"   # Latin-1, not UTF-8


# --------------------------------------------------------------------------- helpers

def lab_doc(tmp_path: Path, mailboxes: Path, auth: Path) -> dict[str, Any]:
    return {
        "hostname": "relay.lab.test",
        "listeners": [
            {"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"},
            {"name": "submission", "address": f"127.0.0.1:{free_port()}", "mode": "submission",
             "allow_insecure_auth": True},
            {"name": "pop3", "address": f"127.0.0.1:{free_port()}", "mode": "pop3", "allow_insecure_auth": True},
        ],
        "mynetworks": ["127.0.0.0/8"],
        "local_domains": ["lab.test"],
        "mailboxes": {"users_file": str(mailboxes)},
        "auth": {"users_file": str(auth)},
        "queue": {"path": str(tmp_path / "queue.db")},
        "metrics": {"address": f"127.0.0.1:{free_port()}"},
        "delivery": {"tls": "none", "retry": {"min_backoff": "0.2s", "max_backoff": "1s"}},
    }


def port_of(doc: dict[str, Any], name: str) -> int:
    return next(int(lc["address"].rsplit(":", 1)[1]) for lc in doc["listeners"] if lc["name"] == name)


def start(daemon: Daemon, timeout: float = 20.0) -> None:
    daemon.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert daemon.proc is not None
        if daemon.proc.poll() is not None:
            raise AssertionError(f"daemon exited during start-up:\n{daemon.log_tail()}")
        if "mta ready" in daemon.log_text():
            return
        time.sleep(0.05)
    raise AssertionError(f"daemon did not start:\n{daemon.log_tail()}")


def healthz(doc: dict[str, Any]) -> tuple[int, str]:
    url = f"http://{doc['metrics']['address']}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def rcpt(doc: dict[str, Any], address: str) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port_of(doc, "mta"), timeout=10) as client:
        client.ehlo("lab1.lab.test")
        client.mail("carol@remote.test")
        code, text = client.rcpt(address)
        return code, text.decode()


def send(doc: dict[str, Any], to: str, tag: str) -> None:
    with smtplib.SMTP("127.0.0.1", port_of(doc, "mta"), timeout=10) as client:
        client.sendmail("carol@remote.test", [to], f"Subject: {tag}\r\nX-Tag: {tag}\r\n\r\n{tag}\r\n")


def auth(doc: dict[str, Any], user: str, password: str) -> tuple[int, str]:
    with smtplib.SMTP("127.0.0.1", port_of(doc, "submission"), timeout=10) as client:
        client.ehlo("lab1.lab.test")
        blob = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        code, text = client.docmd("AUTH", f"PLAIN {blob}")
        return code, text.decode()


def pop3_login(doc: dict[str, Any], user: str, password: str) -> str:
    client = poplib.POP3("127.0.0.1", port_of(doc, "pop3"), timeout=10)
    try:
        client.user(user)
        try:
            return client.pass_(password).decode()
        except poplib.error_proto as exc:
            return exc.args[0].decode()
    finally:
        client.close()


def pop3_messages(doc: dict[str, Any], user: str, password: str) -> list[bytes]:
    client = poplib.POP3("127.0.0.1", port_of(doc, "pop3"), timeout=10)
    try:
        client.user(user)
        client.pass_(password)
        count = len(client.list()[1])
        return [b"\r\n".join(client.retr(n)[1]) for n in range(1, count + 1)]
    finally:
        client.quit()


def enqueue(queue_path: str, to: str, tag: str, sender: str = "bob@lab.test") -> str:
    """Mail already in the queue, as an earlier run of the daemon accepted it."""

    async def put() -> str:
        store = SQLiteStore(queue_path)
        await store.open()
        try:
            queue_id = new_queue_id()
            await store.queue.enqueue(NewMessage(
                id=queue_id, sender=sender, recipients=(Recipient(address=to),),
                data=f"Subject: {tag}\r\nX-Tag: {tag}\r\n\r\n{tag}\r\n".encode(), arrival=time.time(),
                client="127.0.0.1", listener="mta", helo="lab1.lab.test"))
            return queue_id
        finally:
            await store.close()

    return asyncio.run(put())


def queue_rows(queue_path: str) -> list[tuple[str, str, str, int, str | None]]:
    """(message id, sender, state, attempts, last_error) of every pending recipient."""
    with sqlite3.connect(queue_path, timeout=10) as db:
        return db.execute("SELECT m.id, m.sender, r.state, r.attempts, r.last_error FROM recipients r "
                          "JOIN messages m ON m.id = r.message_id ORDER BY m.arrival").fetchall()


def history_events(queue_path: str, message_id: str) -> list[str]:
    with sqlite3.connect(queue_path, timeout=10) as db:
        return [e for (e,) in db.execute("SELECT event FROM history WHERE message_id = ?", (message_id,))]


def deferred_for(queue_path: str, message_id: str, needle: str) -> Callable[[], bool]:
    def check() -> bool:
        return any(mid == message_id and state == "deferred" and attempts >= 1 and needle in (error or "")
                   for mid, _, state, attempts, error in queue_rows(queue_path))
    return check


def tagged(messages: list[bytes], tag: str) -> list[bytes]:
    return [m for m in messages if f"X-Tag: {tag}".encode() in m]


@pytest.fixture
def lab(tmp_path: Path):
    mailboxes, auth_file = tmp_path / "mailboxes", tmp_path / "users"
    write_users(mailboxes, MAILBOXES)
    write_users(auth_file, AUTH)
    doc = lab_doc(tmp_path, mailboxes, auth_file)
    daemon = Daemon(tmp_path, doc)
    try:
        yield doc, daemon, mailboxes, auth_file
    finally:
        daemon.ensure_dead()


# --------------------------------------------------------------------------- the daemon

@pytest.mark.timeout(90)
def test_unreadable_users_files_defer_and_recover(lab):
    """Started with a non-UTF-8 line in both users files (no good copy to fall back on)."""
    doc, daemon, mailboxes, auth_file = lab
    good_mailboxes, good_auth = mailboxes.read_bytes(), auth_file.read_bytes()
    mailboxes.write_bytes(good_mailboxes + BAD_LINE)   # line 3
    auth_file.write_bytes(BAD_LINE + good_auth)         # line 1
    queued = enqueue(doc["queue"]["path"], "alice@lab.test", "queued-before")
    start(daemon)

    expected = f"mailboxes.users_file: {mailboxes} line 3: not valid UTF-8"
    # Mail already queued for a lab mailbox waits; it is not bounced.
    daemon.wait_for("the queued mail to be deferred", deferred_for(doc["queue"]["path"], queued, expected))
    assert rcpt(doc, "alice@lab.test") == (451, "4.3.0 <alice@lab.test>: Temporary lookup failure")
    assert rcpt(doc, "nobody@lab.test") == (451, "4.3.0 <nobody@lab.test>: Temporary lookup failure")
    assert auth(doc, "submitter", "sub pw") == (454, "4.7.0 Temporary authentication failure")
    assert pop3_login(doc, "alice@lab.test", "alice pw").startswith("-ERR [SYS/TEMP] ")
    status, body = healthz(doc)
    assert status == 503
    assert f"mailboxes_users_file: {expected}\n" in body
    assert f"auth_users_file: auth.users_file: {auth_file} line 1: not valid UTF-8\n" in body
    log = daemon.log_text()
    assert expected in log and f"auth.users_file: {auth_file} line 1: not valid UTF-8" in log
    assert "Traceback" not in log
    rows = queue_rows(doc["queue"]["path"])
    assert [(mid, sender, state) for mid, sender, state, _, _ in rows] == [(queued, "bob@lab.test", "deferred")]
    assert "bounced" not in history_events(doc["queue"]["path"], queued)

    # The operator fixes the files: the deferred mail is delivered once, everything heals.
    mailboxes.write_bytes(good_mailboxes)
    auth_file.write_bytes(good_auth)
    daemon.wait_for("the queue to drain", lambda: not queue_rows(doc["queue"]["path"]))
    assert len(tagged(pop3_messages(doc, "alice@lab.test", "alice pw"), "queued-before")) == 1
    # No DSN went to the sender (bob, a lab mailbox): nothing was ever bounced.
    assert pop3_messages(doc, "bob@lab.test", "bob pw") == []
    daemon.wait_for("/healthz 200", lambda: healthz(doc) == (200, "ok\n"))
    assert rcpt(doc, "alice@lab.test")[0] == 250
    assert rcpt(doc, "nobody@lab.test")[0] == 550   # a readable file that lacks the user: unknown
    assert auth(doc, "submitter", "sub pw")[0] == 235
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert "Traceback" not in daemon.log_text()


@pytest.mark.timeout(90)
def test_bad_edit_keeps_the_good_copy_and_a_removed_file_defers(lab):
    doc, daemon, mailboxes, auth_file = lab
    # A byte-order mark, as some editors write it, is not part of the first user name.
    good = codecs.BOM_UTF8 + mailboxes.read_bytes()
    mailboxes.write_bytes(good)
    start(daemon)
    assert rcpt(doc, "alice@lab.test")[0] == 250
    # Delivered: the delivery process has read the good file too.
    send(doc, "alice@lab.test", "before")
    daemon.wait_for("the first delivery", lambda: not queue_rows(doc["queue"]["path"]))
    assert healthz(doc) == (200, "ok\n")

    # 1. A bad edit while running: the copy read before stays in use, loudly.
    mailboxes.write_bytes(good + b"# comment\n" + BAD_LINE)   # line 4
    expected = (f"mailboxes.users_file: {mailboxes} line 4: not valid UTF-8; "
                "the copy read before stays in use")
    daemon.wait_for("the log line", lambda: expected in daemon.log_text())
    status, body = healthz(doc)
    assert (status, body) == (503, f"mailboxes_users_file: {expected}\n")
    assert rcpt(doc, "alice@lab.test")[0] == 250
    assert rcpt(doc, "nobody@lab.test")[0] == 550
    send(doc, "alice@lab.test", "during-bad-edit")
    daemon.wait_for("delivery from the good copy", lambda: not queue_rows(doc["queue"]["path"]))
    assert len(tagged(pop3_messages(doc, "alice@lab.test", "alice pw"), "during-bad-edit")) == 1

    # 2. The file removed: no table to answer from, so every answer is "try later".
    mailboxes.unlink()
    gone = f"mailboxes.users_file: {mailboxes}: No such file or directory"
    daemon.wait_for("/healthz to name the missing file",
                    lambda: healthz(doc) == (503, f"mailboxes_users_file: {gone}\n"))
    assert rcpt(doc, "alice@lab.test") == (451, "4.3.0 <alice@lab.test>: Temporary lookup failure")
    queued = enqueue(doc["queue"]["path"], "alice@lab.test", "while-removed")
    daemon.wait_for("the queued mail to be deferred", deferred_for(doc["queue"]["path"], queued, gone))
    assert gone in daemon.log_text()

    # 3. Put back: delivered once, healthy again, no bounce anywhere.
    mailboxes.write_bytes(good)
    daemon.wait_for("the queue to drain", lambda: not queue_rows(doc["queue"]["path"]))
    assert "bounced" not in history_events(doc["queue"]["path"], queued)
    assert len(tagged(pop3_messages(doc, "alice@lab.test", "alice pw"), "while-removed")) == 1
    assert pop3_messages(doc, "bob@lab.test", "bob pw") == []
    daemon.wait_for("/healthz 200", lambda: healthz(doc) == (200, "ok\n"))
    assert "Traceback" not in daemon.log_text()


@pytest.mark.timeout(60)
def test_removed_auth_file_answers_454_not_535(lab):
    doc, daemon, _, auth_file = lab
    start(daemon)
    assert auth(doc, "submitter", "sub pw")[0] == 235
    saved = auth_file.read_bytes()
    auth_file.unlink()
    assert auth(doc, "submitter", "sub pw") == (454, "4.7.0 Temporary authentication failure")
    status, body = healthz(doc)
    assert (status, body) == (503, f"auth_users_file: auth.users_file: {auth_file}: No such file or directory\n")
    auth_file.write_bytes(saved)
    assert auth(doc, "submitter", "sub pw")[0] == 235
    assert auth(doc, "submitter", "wrong")[0] == 535
    daemon.wait_for("/healthz 200", lambda: healthz(doc) == (200, "ok\n"))


# --------------------------------------------------------------------------- check-config

def check_config(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mta_command("check-config", "--config", str(config)), capture_output=True, text=True,
                          env=subprocess_env(), timeout=60)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("which", ["mailboxes", "auth"])
def test_check_config_names_the_bad_line(lab, which):
    doc, daemon, mailboxes, auth_file = lab
    target, key = (mailboxes, "mailboxes.users_file") if which == "mailboxes" else (auth_file, "auth.users_file")
    good = target.read_bytes()
    target.write_bytes(good + b"\n" + BAD_LINE)   # the users, a blank line, then the bad one
    bad_line = good.count(b"\n") + 2
    result = check_config(daemon.config_path)
    assert result.returncode == 2
    assert result.stderr == f"config: {key}: {target} line {bad_line}: not valid UTF-8\n"
    assert result.stdout == ""


@pytest.mark.timeout(60)
def test_check_config_warns_about_duplicates_and_accepts_a_bom(lab):
    doc, daemon, mailboxes, _ = lab
    lines = mailboxes.read_bytes().splitlines(keepends=True)
    mailboxes.write_bytes(codecs.BOM_UTF8 + b"".join(lines) + lines[0].replace(b"alice@", b"Alice@"))
    result = check_config(daemon.config_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f"warning: mailboxes.users_file: {mailboxes} line 3: duplicate entry for "
                             f"'Alice@lab.test' ignored; line 1 is used (the first entry wins)\n")


# --------------------------------------------------------------------------- the parser

def test_load_users_is_strict_and_names_the_line(tmp_path):
    path = tmp_path / "users"
    path.write_bytes(codecs.BOM_UTF8 + b"# users\r\nalice:h1\r\n\r\nbob:h2\nalice:h3\n")
    warnings: list[str] = []
    assert load_users(path, warn=warnings.append) == {"alice": "h1", "bob": "h2"}
    assert warnings == [f"{path} line 5: duplicate entry for 'alice' ignored; line 2 is used "
                        "(the first entry wins)"]
    for content, problem in ((b"alice:h1\nbob h2\n", "line 2: not a user:hash line"),
                             (b"alice:h1\n:h2\n", "line 2: not a user:hash line"),
                             (b"alice:h1\nb\xffb:h2\n", "line 2: not valid UTF-8"),
                             (b"\xef\xbb\xbf\xef\xbb\xbfalice:h1\n", None)):
        path.write_bytes(content)
        if problem is None:   # only one BOM is taken off: a second is part of the name
            assert list(load_users(path)) == ["\ufeffalice"]
            continue
        with pytest.raises(UsersFileError) as caught:
            load_users(path)
        assert str(caught.value) == f"{path} {problem}"
    with pytest.raises(UsersFileError, match=r": No such file or directory$"):
        load_users(tmp_path / "missing")


def test_users_file_reports_and_clears_its_health(tmp_path):
    path = tmp_path / "users"
    path.write_bytes(b"alice:h1\n")
    health = Health()
    users = UsersFile(path, health=health)
    assert users.lookup("alice") == "h1" and health.ok
    path.write_bytes(b"alice:h1\n\xff\n")
    assert users.lookup("alice") == "h1"   # the good copy
    assert health.faults() == {"auth_users_file": f"auth.users_file: {path} line 2: not valid UTF-8; "
                                                  "the copy read before stays in use"}
    path.unlink()
    with pytest.raises(UsersFileUnavailable, match="No such file or directory"):
        users.lookup("alice")
    with pytest.raises(UsersFileUnavailable):
        users.check("alice", "pw")
    path.write_bytes(b"bob:h2\n")
    assert users.lookup("alice") is None and users.lookup("bob") == "h2"
    assert health.ok
    # A file that cannot be read at all is no table either (here: a directory).
    path.unlink()
    path.mkdir()
    with pytest.raises(UsersFileUnavailable, match="Is a directory"):
        users.lookup("bob")
    assert not health.ok

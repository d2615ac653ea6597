"""The `mta` command line, run as a user would run it: a subprocess, its output and exit status."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
from pathlib import Path

import pytest

from mta.model import NewMessage, RcptState, Recipient
from mta.passwords import read_users, verify_password
from mta.store.api import RecipientUpdate
from mta.store.sqlite.store import SQLiteStore
from tests.support.daemon import mta_command, subprocess_env

pytestmark = pytest.mark.timeout(30)

ARRIVAL = 1_700_000_000  # Tue Nov 14 22:13:20 2023 UTC


def mta(*args: str, input: str | None = None, cwd: Path | None = None,
        **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mta_command(*args), input=input, capture_output=True, text=True, timeout=30,
                          cwd=cwd, env=subprocess_env(TZ="UTC", **env))


@pytest.fixture
def queue_config(tmp_path: Path) -> tuple[Path, Path]:
    """A config file whose queue is tmp_path/queue.db (not created yet)."""
    db = tmp_path / "queue.db"
    path = tmp_path / "mta.yaml"
    path.write_text(f"queue:\n  path: {db}\nmetrics:\n  address: off\n")
    return path, db


async def make_queue(db: Path, *messages: NewMessage,
                     deferrals: tuple[tuple[str, int, str], ...] = ()) -> None:
    """A queue file holding ``messages``; each deferral (queue id, rcpt no, reply) is one failed attempt."""
    store = SQLiteStore(db)
    await store.open()
    try:
        for m in messages:
            await store.queue.enqueue(m)
        for queue_id, rcpt_no, reply in deferrals:
            await store.queue.record_outcomes(
                queue_id, [RecipientUpdate(rcpt_no, RcptState.DEFERRED, 1, ARRIVAL + 300, reply)],
                ARRIVAL + 1)
    finally:
        await store.close()


def message(id: str, sender: str, rcpts: list[Recipient], size: int, arrival: float = ARRIVAL) -> NewMessage:
    return NewMessage(id=id, sender=sender, recipients=tuple(rcpts), data=b"x" * size, arrival=arrival,
                      client="127.0.0.1", listener="mta", helo="client.lab.test")


TWO_MESSAGES = (
    message("0A1B2C3D4E01", "alice@lab.test",
            [Recipient("bob@remote.test"), Recipient("carol@remote.test")], size=1500),
    message("0A1B2C3D4E02", "", [Recipient("postmaster@lab.test", state=RcptState.HELD)],
            size=700, arrival=ARRIVAL + 60),
)
# carol's first attempt failed with a 4xx: she waits for the retry at ARRIVAL + 300.
DEFERRAL = (("0A1B2C3D4E01", 1, "450 4.2.1 carol@remote.test: mailbox busy"),)


# --------------------------------------------------------------------------- --config anywhere

@pytest.mark.parametrize("argv", [
    ("queue", "list", "--config", "{config}"),
    ("queue", "list", "--json", "--config", "{config}"),
    ("--config", "{config}", "queue", "list"),
    ("queue", "--config", "{config}", "list"),
])
async def test_config_option_anywhere(queue_config, tmp_path, argv):
    config, db = queue_config
    await make_queue(db)
    result = mta(*(a.format(config=config) for a in argv), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("" if "--json" in argv else "Mail queue is empty\n")
    assert result.stderr == ""


async def test_config_from_environment(queue_config, tmp_path):
    config, db = queue_config
    await make_queue(db)
    result = mta("queue", "list", cwd=tmp_path, MTA_CONFIG=str(config))
    assert (result.returncode, result.stdout, result.stderr) == (0, "Mail queue is empty\n", "")
    # --config wins over $MTA_CONFIG.
    broken = tmp_path / "broken.yaml"
    broken.write_text("bogus: 1\n")
    result = mta("queue", "list", "--config", str(config), cwd=tmp_path, MTA_CONFIG=str(broken))
    assert (result.returncode, result.stdout) == (0, "Mail queue is empty\n")
    result = mta("check-config", cwd=tmp_path, MTA_CONFIG=str(broken))
    assert (result.returncode, result.stderr) == (2, "config: bogus: unknown key\n")


def test_without_config_uses_defaults(tmp_path):
    result = mta("queue", "list", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr == "mta: queue: var/queue.db: no queue database (has the daemon run?)\n"
    result = mta("check-config", cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "config: <built-in defaults>: ok\n", "")


# --------------------------------------------------------------------------- check-config

def test_check_config_ok(queue_config):
    config, _ = queue_config
    result = mta("check-config", "--config", str(config))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"config: {config}: ok\n", "")


def test_check_config_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    result = mta("check-config", "--config", str(missing))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"config: {missing}: No such file or directory\n"


def test_help():
    result = subprocess.run(mta_command("--help"), capture_output=True, text=True, timeout=30,
                            env=subprocess_env())
    assert result.returncode == 0
    assert result.stdout.startswith("usage: mta ")
    for command in ("serve", "check-config", "queue", "passwd"):
        assert command in result.stdout
    result = mta("queue", "list", "--help")
    assert result.returncode == 0
    assert "--json" in result.stdout and "--config" in result.stdout


def test_no_command_is_a_usage_error():
    result = mta()
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usage: mta ")


# --------------------------------------------------------------------------- passwd

def test_passwd_creates_users_file(tmp_path):
    users = tmp_path / "etc" / "users"
    users.parent.mkdir()
    password = "correct horse battery staple"
    result = mta("passwd", "--users-file", str(users), "alice", input=password + "\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    text = users.read_text()
    assert password not in text
    assert "horse" not in text
    lines = text.splitlines()
    assert len(lines) == 1
    user, _, hashed = lines[0].partition(":")
    assert user == "alice"
    assert hashed.startswith("scrypt$")
    assert verify_password(password, hashed)
    assert not verify_password("wrong", hashed)
    assert read_users(users) == {"alice": hashed}
    assert [p.name for p in users.parent.iterdir()] == ["users"]  # no temporary file left behind


def test_passwd_refuses_to_create_a_missing_directory(tmp_path):
    users = tmp_path / "etc" / "mta" / "users"    # a typo'd path must not become a new tree
    result = mta("passwd", "--users-file", str(users), "alice", input="pw\n")
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == f"mta passwd: {users.parent}: no such directory (create it first)\n"
    assert not (tmp_path / "etc").exists()


def test_passwd_delete(tmp_path):
    users = tmp_path / "users"
    for user in ("alice", "bob"):
        assert mta("passwd", "--users-file", str(users), user, input=f"{user}-pw\n").returncode == 0
    result = mta("passwd", "--users-file", str(users), "--delete", "alice")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert list(read_users(users)) == ["bob"]
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    again = mta("passwd", "--users-file", str(users), "--delete", "alice")
    assert (again.returncode, again.stderr) == (1, f"mta passwd: {users}: no user alice\n")
    assert list(read_users(users)) == ["bob"]


def test_version_and_short_config_option(tmp_path):
    import mta as package
    result = mta("--version")
    assert (result.returncode, result.stdout) == (0, f"mta {package.__version__}\n")
    config = tmp_path / "c.yaml"
    config.write_text("hostname: relay.lab.test\nmetrics: {address: null}\n"
                      f"queue: {{path: {tmp_path / 'q.db'}}}\n")
    result = mta("check-config", "-c", str(config))
    assert result.returncode == 0 and result.stdout == f"config: {config}: ok\n", result.stderr


def _all_parsers(parser):
    import argparse
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def test_help_describes_every_command_option_and_argument():
    from mta.cli import _parser
    top = mta("--help")
    assert top.returncode == 0 and "SUPPRESS" not in top.stdout
    for parser in _all_parsers(_parser()):
        for action in parser._actions:
            if action.dest in ("help",) or action.help is None and action.option_strings == [] and \
                    action.__class__.__name__ == "_SubParsersAction":
                continue
            assert action.help and "SUPPRESS" not in str(action.help), (parser.prog, action.dest)
        assert "SUPPRESS" not in parser.format_help(), parser.prog


def test_passwd_replaces_one_user_and_keeps_the_rest(tmp_path):
    users = tmp_path / "users"
    assert mta("passwd", "--users-file", str(users), "alice", input="alice-pw\n").returncode == 0
    assert mta("passwd", "--users-file", str(users), "bob", input="bob-old\n").returncode == 0
    users.write_text("# lab relay users\n" + users.read_text())
    users.chmod(0o644)
    before = users.read_text().splitlines()
    alice_line = next(line for line in before if line.startswith("alice:"))
    bob_old = next(line for line in before if line.startswith("bob:"))

    result = mta("passwd", "--users-file", str(users), "bob", input="bob-new\n")
    assert (result.returncode, result.stderr) == (0, "")
    after = users.read_text().splitlines()
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    assert "# lab relay users" in after
    assert alice_line in after                    # untouched, byte for byte
    assert bob_old not in after
    assert len([line for line in after if line.startswith("bob:")]) == 1
    assert len(after) == 3
    stored = read_users(users)
    assert set(stored) == {"alice", "bob"}
    assert verify_password("bob-new", stored["bob"])
    assert not verify_password("bob-old", stored["bob"])
    assert verify_password("alice-pw", stored["alice"])
    assert "bob-new" not in users.read_text()


@pytest.mark.parametrize("user", ["bad:name", " alice", "alice "])
def test_passwd_rejects_bad_user_names(tmp_path, user):
    users = tmp_path / "users"
    result = mta("passwd", "--users-file", str(users), user, input="secret\n")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("mta passwd: user name ")
    assert result.stderr.endswith("\n") and result.stderr.count("\n") == 1
    assert not users.exists()


def test_passwd_rejects_an_empty_password(tmp_path):
    users = tmp_path / "users"
    result = mta("passwd", "--users-file", str(users), "alice", input="\n")
    assert (result.returncode, result.stderr) == (1, "mta passwd: empty password\n")
    assert not users.exists()


def test_passwd_does_not_read_the_config(tmp_path):
    # A broken $MTA_CONFIG must not stop an operator from adding a user.
    broken = tmp_path / "broken.yaml"
    broken.write_text("bogus: 1\n")
    users = tmp_path / "users"
    result = mta("passwd", "--users-file", str(users), "alice", input="pw\n", MTA_CONFIG=str(broken))
    assert (result.returncode, result.stderr) == (0, "")
    assert list(read_users(users)) == ["alice"]


# --------------------------------------------------------------------------- queue list

async def test_queue_list_empty(queue_config):
    config, db = queue_config
    await make_queue(db)
    result = mta("queue", "list", "--config", str(config))
    assert (result.returncode, result.stdout, result.stderr) == (0, "Mail queue is empty\n", "")


async def test_queue_list_mailq_format(queue_config):
    config, db = queue_config
    await make_queue(db, *TWO_MESSAGES, deferrals=DEFERRAL)
    result = mta("queue", "list", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    pad = " " * 45
    assert result.stdout.splitlines() == [
        "-Queue ID-    --Size-- ----Arrival Time---- -Sender/Recipient-------",
        "0A1B2C3D4E01*     1500 Tue Nov 14 22:13:20  alice@lab.test",  # * active: bob is due
        f"{pad}bob@remote.test [queued]",
        f"{pad}(450 4.2.1 carol@remote.test: mailbox busy)",
        f"{pad}carol@remote.test [deferred]",
        "",
        "0A1B2C3D4E02!      700 Tue Nov 14 22:14:20  MAILER-DAEMON",   # ! on hold
        f"{pad}postmaster@lab.test [held]",
        "",
        "-- 3 Kbytes in 2 Requests.",
    ]


async def test_queue_list_one_request(queue_config):
    config, db = queue_config
    await make_queue(db, message("0A1B2C3D4E03", "a@lab.test", [Recipient("b@remote.test")], size=1024))
    result = mta("queue", "list", "--config", str(config))
    assert result.returncode == 0
    assert result.stdout.splitlines()[-1] == "-- 1 Kbytes in 1 Request."


async def test_queue_list_json(queue_config):
    config, db = queue_config
    await make_queue(db, *TWO_MESSAGES, deferrals=DEFERRAL)
    result = mta("queue", "list", "--json", "--config", str(config))
    assert (result.returncode, result.stderr) == (0, "")
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert objects == [
        {"queue_name": "active", "queue_id": "0A1B2C3D4E01", "arrival_time": ARRIVAL, "message_size": 1500,
         "sender": "alice@lab.test",
         "recipients": [
             # fresh mail is due from its arrival on
             {"address": "bob@remote.test", "state": "queued", "attempts": 0, "next_attempt": ARRIVAL},
             {"address": "carol@remote.test", "state": "deferred", "attempts": 1,
              "next_attempt": ARRIVAL + 300,
              "delay_reason": "450 4.2.1 carol@remote.test: mailbox busy"},
         ]},
        {"queue_name": "hold", "queue_id": "0A1B2C3D4E02", "arrival_time": ARRIVAL + 60, "message_size": 700,
         "sender": "",
         "recipients": [
             {"address": "postmaster@lab.test", "state": "held", "attempts": 0, "next_attempt": ARRIVAL + 60},
         ]},
    ]


def test_queue_list_without_a_queue_file(queue_config):
    config, db = queue_config
    for argv in (("queue", "list"), ("queue", "list", "--json")):
        result = mta(*argv, "--config", str(config))
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr == f"mta: queue: {db}: no queue database (has the daemon run?)\n"
    assert not db.exists()  # listing never creates a queue


async def test_queue_list_while_the_daemon_holds_the_queue(queue_config):
    """mailq must work while the daemon has the database open and keeps committing."""
    config, db = queue_config
    store = SQLiteStore(db)
    await store.open()
    try:
        await store.queue.enqueue(TWO_MESSAGES[0])
        proc = await asyncio.create_subprocess_exec(
            *mta_command("queue", "list", "--json", "--config", str(config)),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=subprocess_env())
        communicate = asyncio.ensure_future(proc.communicate())
        n = 0
        while not communicate.done():  # keep writing for as long as the CLI runs
            n += 1
            await store.queue.enqueue(message(f"0B{n:010X}", "load@lab.test", [Recipient("x@remote.test")],
                                        size=100, arrival=ARRIVAL + 1000 + n))
            await asyncio.sleep(0.005)
        stdout, stderr = await asyncio.wait_for(communicate, 30)
    finally:
        await store.close()
    assert proc.returncode == 0, stderr.decode()
    assert stderr == b""
    listed = [json.loads(line) for line in stdout.decode().splitlines()]
    assert listed[0]["queue_id"] == "0A1B2C3D4E01"
    assert 1 <= len(listed) <= n + 1
    assert all(m["recipients"] for m in listed)  # a message is listed whole or not at all


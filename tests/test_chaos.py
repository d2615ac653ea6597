"""Chaos (Mailpit's fault injection): triggers set over HTTP, seen on the wire by SMTP clients.

The daemon runs in the test's process with a relay listener, a submission
listener and an http listener, which serves the chaos API; smtplib (in a thread) and a raw wire client talk to the
listeners. What is checked: each trigger's reply at MAIL, RCPT and AUTH, that 0%
never fires, the metric, the log line, every kind of bad PUT, and that nothing
works with ``chaos: false``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import signal
import smtplib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mta.config import Config
from mta.daemon.main_process import App
from mta.errors import ConfigError
from mta.inbound.chaos import Chaos, Trigger
from tests.support.daemon import Daemon
from tests.support.daemon import metric as scrape
from tests.support.in_process import listener_port, running
from tests.support.ports import free_port
from tests.support.waiting import wait_until
from tests.support.wire import Wire

pytestmark = pytest.mark.timeout(30)

DEFAULTS = {"Sender": {"ErrorCode": 451, "Probability": 0}, "Recipient": {"ErrorCode": 451, "Probability": 0},
            "Authentication": {"ErrorCode": 535, "Probability": 0}}
BODY = b"Subject: chaos\r\nFrom: lab@lab.test\r\n\r\nbody\r\n"


@pytest.fixture
def chaos_config(make_config: Callable[..., Config], users_file: Any) -> Callable[..., Config]:
    def make(chaos: bool = True) -> Config:
        return make_config(
            listeners=[{"name": "mta", "address": f"127.0.0.1:{free_port()}", "mode": "relay"},
                       {"name": "submission", "address": f"127.0.0.1:{free_port()}", "mode": "submission",
                        "allow_insecure_auth": True},
                       {"name": "web", "address": f"127.0.0.1:{free_port()}", "mode": "http"}],
            auth={"users_file": str(users_file)}, relay_domains=["remote.test"], chaos=chaos)
    return make


@contextlib.asynccontextmanager
async def chaos_http(app: App) -> AsyncIterator[aiohttp.ClientSession]:
    """A client session for the daemon's http listener ("web")."""
    async with aiohttp.ClientSession(f"http://127.0.0.1:{listener_port(app.config, 'web')}",
                                     timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@contextlib.asynccontextmanager
async def daemon(config: Config) -> AsyncIterator[tuple[App, aiohttp.ClientSession]]:
    async with running(config) as app, chaos_http(app) as http:
        yield app, http


async def put(http: aiohttp.ClientSession, body: Any) -> tuple[int, str, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.put("/api/v1/chaos", data=data, headers={"Content-Type": "application/json"}) as r:
        return r.status, r.headers["Content-Type"], await r.text()


async def get(http: aiohttp.ClientSession) -> tuple[int, str, str]:
    async with http.get("/api/v1/chaos") as r:
        return r.status, r.headers["Content-Type"], await r.text()


async def set_triggers(http: aiohttp.ClientSession, body: dict[str, Any]) -> dict[str, Any]:
    status, content_type, text = await put(http, body)
    assert (status, content_type) == (200, "application/json"), text
    result: dict[str, Any] = json.loads(text)
    return result


def smtp(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10)
    client.ehlo()
    return client


def metric(app: App, trigger: str, listener: str) -> float:
    text = app.metrics.render().decode()
    match = re.search(rf'^mta_chaos_triggered_total\{{listener="{listener}",trigger="{trigger}"\}} (\S+)$',
                      text, re.M)
    assert match is not None, text
    return float(match.group(1))


def rejects(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mta.smtpd" and "NOQUEUE: reject" in r.getMessage()]


# --------------------------------------------------------------------------- on the wire

async def test_sender_trigger_refuses_mail_from(chaos_config, caplog):
    caplog.set_level(logging.INFO, logger="mta")
    config = chaos_config()
    async with daemon(config) as (app, http):
        assert await set_triggers(http, {"Sender": {"ErrorCode": 451, "Probability": 100}}) == \
            {**DEFAULTS, "Sender": {"ErrorCode": 451, "Probability": 100}}

        def send() -> tuple[int, bytes]:
            with smtp(listener_port(config)) as client:
                try:
                    client.sendmail("lab@lab.test", ["bob@remote.test"], BODY)
                except smtplib.SMTPSenderRefused as exc:
                    return exc.smtp_code, exc.smtp_error
            raise AssertionError("the message was accepted")

        assert await asyncio.to_thread(send) == (451, b"4.3.0 Chaos sender error")
        assert metric(app, "sender", "mta") == 1
        assert metric(app, "recipient", "mta") == 0
    [line] = rejects(caplog)
    assert re.fullmatch(r"NOQUEUE: reject: MAIL from \S+\[127\.0\.0\.1\]: 451 4\.3\.0 Chaos sender error; "
                        r"from=<lab@lab\.test> proto=ESMTP helo=<client\.test>", line), line
    assert "Sender 451 at 100%, Recipient 451 at 0%, Authentication 535 at 0%" in caplog.text


async def test_recipient_trigger_refuses_each_rcpt_with_its_code(chaos_config, caplog):
    caplog.set_level(logging.INFO, logger="mta")
    config = chaos_config()
    async with daemon(config) as (app, http):
        await set_triggers(http, {"Recipient": {"ErrorCode": 550, "Probability": 100}})

        def send() -> dict[str, tuple[int, bytes]]:
            with smtp(listener_port(config)) as client:
                try:
                    client.sendmail("lab@lab.test", ["bob@remote.test", "carol@remote.test"], BODY)
                except smtplib.SMTPRecipientsRefused as exc:
                    return dict(exc.recipients)
            raise AssertionError("the message was accepted")

        refused = await asyncio.to_thread(send)
        assert refused == {"bob@remote.test": (550, b"5.0.0 Chaos recipient error"),
                           "carol@remote.test": (550, b"5.0.0 Chaos recipient error")}
        assert metric(app, "recipient", "mta") == 2
        assert metric(app, "sender", "mta") == 0
    assert [re.sub(r"from \S+\[", "from X[", line) for line in rejects(caplog)] == [
        f"NOQUEUE: reject: RCPT from X[127.0.0.1]: 550 5.0.0 Chaos recipient error; from=<lab@lab.test> "
        f"to=<{rcpt}> proto=ESMTP helo=<client.test>" for rcpt in ("bob@remote.test", "carol@remote.test")]


async def test_wire_transcript_and_421_closes_the_connection(chaos_config):
    """The exact reply lines; a code without an enhanced code of its own gets class.0.0;
    a 421 closes the connection after the reply (RFC 5321 §3.8)."""
    config = chaos_config()
    async with daemon(config) as (app, http):
        await set_triggers(http, {"Sender": {"ErrorCode": 456, "Probability": 100}})
        async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
            await w.ehlo("client.test")
            assert await w.cmd("MAIL FROM:<lab@lab.test>") == "456 4.0.0 Chaos sender error"
            assert await w.cmd("RCPT TO:<bob@remote.test>") == "503 5.5.1 Error: need MAIL command"
            await set_triggers(http, {"Recipient": {"ErrorCode": 452, "Probability": 100}})
            assert await w.cmd("MAIL FROM:<lab@lab.test>") == "250 2.1.0 Ok"
            assert await w.cmd("RCPT TO:<bob@remote.test>") == "452 4.3.1 Chaos recipient error"
            assert await w.cmd("DATA") == "503 5.5.1 Error: need RCPT command"
        await set_triggers(http, {"Sender": {"ErrorCode": 421, "Probability": 100}})
        async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
            await w.ehlo("client.test")
            assert await w.cmd("MAIL FROM:<lab@lab.test>") == "421 4.7.0 Chaos sender error"
            assert await asyncio.wait_for(w.reader.read(), 5) == b""   # closed by the server
        assert metric(app, "sender", "mta") == 2
        assert metric(app, "recipient", "mta") == 1


async def test_authentication_trigger_on_submission(chaos_config, caplog):
    caplog.set_level(logging.INFO, logger="mta")
    config = chaos_config()
    port = listener_port(config, "submission")
    async with daemon(config) as (app, http):
        await set_triggers(http, {"Authentication": {"Probability": 100}})   # code left out: 535

        def login() -> tuple[int, bytes]:
            with smtp(port) as client:
                client.user, client.password = "alice", "s3cret pass"   # what login() sets for auth_plain
                try:
                    client.auth("PLAIN", client.auth_plain)   # one mechanism, one AUTH command
                except smtplib.SMTPAuthenticationError as exc:
                    return exc.smtp_code, exc.smtp_error
            raise AssertionError("logged in")

        assert await asyncio.to_thread(login) == (535, b"5.7.8 Chaos authentication error")
        # Before the credentials: the client never got a 334 challenge (AUTH PLAIN without
        # an initial response), and a refused AUTH leaves the session usable.
        async with await Wire.connect("127.0.0.1", port) as w:
            await w.ehlo("client.test")
            assert await w.cmd("AUTH PLAIN") == "535 5.7.8 Chaos authentication error"
            assert await w.cmd("AUTH LOGIN") == "535 5.7.8 Chaos authentication error"
            # aiosmtpd's checks come first: an unknown mechanism is still 504.
            assert await w.cmd("AUTH CRAM-MD5") == "504 5.5.4 Unrecognized authentication type"
            await set_triggers(http, {"Authentication": {"ErrorCode": 454, "Probability": 0}})
            plain = base64.b64encode(b"\0alice\0s3cret pass").decode()
            assert await w.cmd(f"AUTH PLAIN {plain}") == "235 2.7.0 Authentication successful"
        assert metric(app, "authentication", "submission") == 3
        assert metric(app, "authentication", "mta") == 0
    lines = [re.sub(r"from \S+\[", "from X[", line) for line in rejects(caplog)]
    assert lines == [f"NOQUEUE: reject: AUTH from X[127.0.0.1]: 535 5.7.8 Chaos authentication error; "
                     f"sasl_method={m} proto=ESMTP helo=<client.test>" for m in ("PLAIN", "PLAIN", "LOGIN")]
    # No SASL failure warning (fail2ban would ban the lab's client for a fault it asked for).
    assert "authentication failed" not in caplog.text


async def test_probability_zero_never_fires(chaos_config):
    config = chaos_config()
    async with daemon(config) as (app, http):
        await set_triggers(http, {name: {"ErrorCode": 554, "Probability": 0} for name in DEFAULTS})

        def send_many() -> list[dict[str, tuple[int, bytes]]]:
            results = []
            with smtplib.SMTP("127.0.0.1", listener_port(config, "submission"), local_hostname="client.test",
                              timeout=10) as client:
                client.login("alice", "s3cret pass")
                for n in range(25):
                    results.append(client.sendmail("alice@lab.test", ["bob@remote.test", "carol@remote.test"],
                                                   BODY + str(n).encode() + b"\r\n"))
            return results

        assert await asyncio.to_thread(send_many) == [{}] * 25
        for trigger in ("sender", "recipient", "authentication"):
            assert metric(app, trigger, "submission") == 0


async def test_chaos_off_refuses_the_api_and_never_fires(chaos_config):
    config = chaos_config(chaos=False)
    assert config.chaos is False
    async with daemon(config) as (app, http):
        assert await get(http) == (400, "text/plain; charset=utf-8", "Chaos is not enabled")
        assert await put(http, {"Sender": {"ErrorCode": 451, "Probability": 100}}) == \
            (400, "text/plain; charset=utf-8", "Chaos is not enabled")
        # Even triggers set behind the API's back do nothing while chaos is off.
        app.chaos.triggers = {name: Trigger(451, 100) for name in DEFAULTS}
        async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
            await w.ehlo("client.test")
            assert await w.cmd("MAIL FROM:<lab@lab.test>") == "250 2.1.0 Ok"
            assert await w.cmd("RCPT TO:<bob@remote.test>") == "250 2.1.5 Ok"
        assert metric(app, "sender", "mta") == 0


# --------------------------------------------------------------------------- the API

async def test_get_and_put_shapes(chaos_config):
    """Mailpit's bodies; a PUT replaces all three (one left out is reset, {} resets all);
    names match without regard to case, as Go's JSON decoder matches them."""
    config = chaos_config()
    async with daemon(config) as (app, http):
        status, content_type, text = await get(http)
        assert (status, content_type) == (200, "application/json")
        assert text == '{"Sender":{"ErrorCode":451,"Probability":0},"Recipient":{"ErrorCode":451,"Probability":0},' \
                       '"Authentication":{"ErrorCode":535,"Probability":0}}\n'
        both = {"Sender": {"ErrorCode": 450, "Probability": 5}, "Recipient": {"ErrorCode": 550, "Probability": 7}}
        assert await set_triggers(http, both) == {**DEFAULTS, **both}
        assert json.loads((await get(http))[2]) == {**DEFAULTS, **both}
        assert await set_triggers(http, {"recipient": {"errorcode": 0, "PROBABILITY": 9}, "Sender": None}) == \
            {**DEFAULTS, "Recipient": {"ErrorCode": 451, "Probability": 9}}
        assert await set_triggers(http, {"Authentication": {"ErrorCode": 454.0, "Probability": 100}}) == \
            {**DEFAULTS, "Authentication": {"ErrorCode": 454, "Probability": 100}}
        assert await set_triggers(http, {}) == DEFAULTS
        async with http.post("/api/v1/chaos", data=b"{}") as r:
            assert r.status == 405


BAD_PUTS = [
    ({"Sender": {"ErrorCode": 399, "Probability": 100}}, "Sender: error code must be between 400 and 599"),
    ({"Recipient": {"ErrorCode": 600, "Probability": 1}}, "Recipient: error code must be between 400 and 599"),
    ({"Authentication": {"ErrorCode": 535, "Probability": 101}},
     "Authentication: probability must be between 0 and 100"),
    ({"Sender": {"Probability": -1}}, "Sender: probability must be between 0 and 100"),
    ({"Sender": {"ErrorCode": "451", "Probability": 1}}, "Sender.ErrorCode: expected an integer, got a string"),
    ({"Sender": {"ErrorCode": 451, "Probability": 12.5}},
     "Sender.Probability: expected an integer, got the number 12.5"),
    ({"Sender": {"ErrorCode": 451, "Probability": True}}, "Sender.Probability: expected an integer, got a boolean"),
    ({"Sender": {"ErrorCode": 451, "Chance": 5}}, 'Sender: unknown field "Chance" (want ErrorCode, Probability)'),
    ({"Sender": 451}, "Sender: expected an object with ErrorCode and Probability, got the number 451"),
    ({"Senders": {"ErrorCode": 451, "Probability": 5}},
     'unknown trigger "Senders" (want Sender, Recipient, Authentication)'),
    ([], "expected a JSON object of triggers (Sender, Recipient, Authentication), got an array"),
    (b'{"Sender": {"ErrorCode": 451, "Probability": 5}, "sender": {}}', "trigger Sender is given twice"),
    (b'{"Sender": {"ErrorCode": 451,', "invalid JSON: Expecting property name enclosed in double quotes "
                                      "at line 1 column 30"),
    (b"", "request body is empty (want a JSON object of triggers)"),
    (b"\xff\xfe\x00", "invalid JSON: not UTF-8 text"),
    (b"{} {}", "invalid JSON: Extra data at line 1 column 4"),
]


async def test_bad_puts_are_400_with_one_line_and_change_nothing(chaos_config):
    config = chaos_config()
    async with daemon(config) as (app, http):
        good = {"Sender": {"ErrorCode": 452, "Probability": 3}}
        await set_triggers(http, good)
        for body, reason in BAD_PUTS:
            # A good trigger before the bad one is not taken either (Mailpit would have set it).
            if isinstance(body, dict):
                body = {"Recipient": {"ErrorCode": 450, "Probability": 50}, **body}
            assert await put(http, body) == (400, "text/plain; charset=utf-8", reason), body
            assert json.loads((await get(http))[2]) == {**DEFAULTS, **good}


# --------------------------------------------------------------------------- the parts

def test_probability_is_a_percentage_of_rolls_0_to_99():
    """Mailpit's rule: a roll of 0-99 fires when below the probability, so 1% fires on
    one roll in a hundred and 100% on all."""
    for probability in (0, 1, 50, 99, 100):
        fired = 0
        for roll in range(100):
            chaos = Chaos(enabled=True, roll=lambda roll=roll: roll)
            chaos.set({"Sender": Trigger(451, probability)})
            fired += chaos.fire("Sender") is not None
        assert fired == probability


def test_the_real_roll_fires_about_as_often_as_asked():
    chaos = Chaos(enabled=True)
    chaos.set({"Recipient": Trigger(451, 30)})
    fired = sum(chaos.fire("Recipient") is not None for _ in range(20000))
    assert 5400 < fired < 6600   # 30% of 20000; the bounds are > 9 standard deviations out


def test_switching_chaos_off_drops_the_triggers():
    chaos = Chaos(enabled=True)
    chaos.set({"Sender": Trigger(451, 100)})
    chaos.enabled = False
    assert chaos.fire("Sender") is None
    chaos.enabled = True
    assert chaos.fire("Sender") is None
    assert chaos.to_json() == DEFAULTS


def test_config_key(make_config):
    assert make_config().chaos is False
    assert make_config(chaos=True).chaos is True
    with pytest.raises(ConfigError, match=r'^chaos: "yes" is not true or false$'):
        make_config(chaos="yes")


def test_metric_series_exist_at_zero_for_every_smtp_listener(chaos_config):
    app = App(chaos_config())
    text = app.metrics.render().decode()
    for listener in ("mta", "submission"):
        for trigger in ("sender", "recipient", "authentication"):
            assert f'mta_chaos_triggered_total{{listener="{listener}",trigger="{trigger}"}} 0.0' in text
    assert 'listener="web"' not in text   # the http listener takes no SMTP


async def test_reload_switches_chaos_off_and_drops_the_triggers(chaos_config, write_config):
    config = chaos_config()
    doc: dict[str, Any] = {
        "hostname": config.hostname, "queue": {"path": config.queue.path}, "metrics": {"address": None},
        "listeners": [{"name": lc.name, "address": lc.address, "mode": lc.mode}
                      | ({"allow_insecure_auth": True} if lc.mode == "submission" else {})
                      for lc in config.listeners],
        "auth": {"users_file": config.auth.users_file}, "relay_domains": ["remote.test"], "chaos": True}
    path = write_config(doc)
    app = App(config, str(path), deliver=False)
    await app.start()
    try:
        async with chaos_http(app) as http:
            await set_triggers(http, {"Sender": {"ErrorCode": 451, "Probability": 100}})
            write_config({**doc, "chaos": False})
            app.reload()
            assert await get(http) == (400, "text/plain; charset=utf-8", "Chaos is not enabled")
            async with await Wire.connect("127.0.0.1", listener_port(config)) as w:
                await w.ehlo("client.test")
                assert await w.cmd("MAIL FROM:<lab@lab.test>") == "250 2.1.0 Ok"
            write_config(doc)
            app.reload()
            assert json.loads((await get(http))[2]) == DEFAULTS   # on again, with nothing set
    finally:
        await app.shutdown()


# --------------------------------------------------------------------------- a real daemon

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00 \S+ "


async def test_end_to_end_through_mta_serve(tmp_path: Path):
    """`mta serve` with chaos: true: a PUT over HTTP, an SMTP client refused at RCPT, the log
    line and the metric; the triggers reset; a SIGHUP to chaos: false closes the API."""
    smtp_port, web_port, metrics_port = free_port(), free_port(), free_port()
    doc: dict[str, Any] = {
        "hostname": "relay.lab.test",
        "listeners": [{"name": "mta", "address": f"127.0.0.1:{smtp_port}", "mode": "relay"},
                      {"name": "web", "address": f"127.0.0.1:{web_port}", "mode": "http"}],
        "queue": {"path": str(tmp_path / "queue.db")},
        "metrics": {"address": f"127.0.0.1:{metrics_port}"},
        "delivery": {"routes": {"remote.test": f"127.0.0.2:{free_port('127.0.0.2')}"},   # nobody there: deferred
                     "retry": {"min_backoff": "1h"}},
        "chaos": True,
    }
    mta = Daemon(tmp_path, doc)
    await mta.started()
    try:
        # started() waits for the SMTP greeting; the http listener opens after the SMTP ones.
        await wait_until(lambda: "mta ready" in mta.log_text(), 15, mta.log_tail)
        async with aiohttp.ClientSession(f"http://127.0.0.1:{web_port}",
                                         timeout=aiohttp.ClientTimeout(total=10)) as http:
            assert json.loads((await get(http))[2]) == DEFAULTS
            await set_triggers(http, {"Recipient": {"ErrorCode": 451, "Probability": 100}})

            def send() -> dict[str, tuple[int, bytes]]:
                with smtp(smtp_port) as client:
                    try:
                        return client.sendmail("lab@lab.test", ["bob@remote.test"], BODY)
                    except smtplib.SMTPRecipientsRefused as exc:
                        return dict(exc.recipients)

            assert await asyncio.to_thread(send) == {"bob@remote.test": (451, b"4.3.0 Chaos recipient error")}
            assert await asyncio.to_thread(scrape, metrics_port,
                                           'mta_chaos_triggered_total{listener="mta",trigger="recipient"}') == 1
            await set_triggers(http, {})
            assert await asyncio.to_thread(send) == {}   # accepted: no recipient refused

            doc["chaos"] = False
            mta.config_path.write_text(json.dumps(doc))   # JSON is YAML
            assert mta.proc is not None
            mta.proc.send_signal(signal.SIGHUP)
            mta.wait_for("reload", lambda: "reload: configuration re-read" in mta.log_text())
            assert await get(http) == (400, "text/plain; charset=utf-8", "Chaos is not enabled")
        assert await mta.terminate() == 0
    finally:
        mta.ensure_dead()
    log = mta.log_text()
    assert "Traceback" not in log
    [reject] = [line for line in log.splitlines() if "NOQUEUE: reject" in line]
    assert re.fullmatch(STAMP + r"mta/smtpd\[\d+\]: NOQUEUE: reject: RCPT from \S+\[127\.0\.0\.1\]: "
                        r"451 4\.3\.0 Chaos recipient error; from=<lab@lab\.test> to=<bob@remote\.test> "
                        r"proto=ESMTP helo=<client\.test>", reject), reject
    assert re.search(r"mta/chaos\[\d+\]: triggers set by HTTP client 127\.0\.0\.1: Sender 451 at 0%, "
                     r"Recipient 451 at 100%, Authentication 535 at 0%", log), log
    assert re.search(r"mta/master\[\d+\]: reload: chaos disabled, triggers cleared", log), log

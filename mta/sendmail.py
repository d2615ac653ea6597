"""sendmail(1): the command line that cron, mail(1), PHP's mail() and git send-email call.

``mta sendmail ARGS`` (or the ``mta-sendmail`` script, which an operator may
link as /usr/sbin/sendmail) takes the options of Postfix's sendmail(1) that
those programs use:

    sendmail [-t] [-i|-oi] [-f sender] [-F name] [-N notify] [-R ret] [-V envid] [--] rcpt...
    sendmail -bs        an SMTP session on standard input and output
    sendmail -bp        the queue, as `mta queue list` (mailq)
    sendmail -q         flush the queue, as `mta queue flush`

The message is read from standard input; unless -i, a line holding a single
"." ends it. Missing From:, Date: and Message-ID: are added, as Postfix's
cleanup does for local submissions, and a Bcc: header is removed with -t.

It hands the message to the local daemon over SMTP (the first relay or
submission listener, from loopback: mynetworks must include it, as the
defaults do). When the daemon is down but the queue file is writable, the
message is committed to the queue directly, and the daemon delivers it when
it starts: exit 0 only once the message is durable. Otherwise exit 75
(EX_TEMPFAIL, "try again later": cron and mail(1) keep the message or report
it) with one line naming the reason. Exit statuses are sysexits.h's.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import pwd
import re
import select
import smtplib
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO

from mta.config import Config, ListenerConfig, load_config
from mta.errors import ConfigError, StartupError, StoreError
from mta.model import NewMessage, Recipient, normalize_line_ends

EX_OK = 0
EX_USAGE = 64        # a bad option
EX_DATAERR = 65      # no recipients, or a recipient the daemon refuses for good
EX_UNAVAILABLE = 69  # the daemon refused the message for good
EX_SOFTWARE = 70
EX_TEMPFAIL = 75     # try again later: the daemon is down and the queue cannot be written

PROG = "sendmail"
DEFAULT_CONFIG = "/etc/mta/mta.yaml"   # used when it exists and neither -C nor $MTA_CONFIG says otherwise
SMTP_TIMEOUT = 60.0
EOF_LINGER = 2.0     # -bs: seconds to wait for further replies after input ends without QUIT

# Postfix's sendmail(1) getopt string: options that take a value.
_WITH_VALUE = set("ABCFLNORVXbefhopr")
_FLAGS = set("GIUcimntvx")


class UsageError(Exception):
    pass


class TempFail(Exception):
    """Exit 75 with this one-line reason."""


class Refused(Exception):
    """The daemon refused for good: exit ``status`` with this one-line reason."""

    def __init__(self, reason: str, status: int = EX_UNAVAILABLE):
        super().__init__(reason)
        self.status = status


@dataclass
class Options:
    recipients: list[str] = field(default_factory=list)
    extract: bool = False          # -t
    dots_end_input: bool = True    # cleared by -i / -oi
    sender: str | None = None      # -f / -r
    full_name: str | None = None   # -F
    mode: str = "m"                # -bm (deliver), -bs, -bp, or "q" for -q
    notify: str | None = None      # -N (RFC 3461 NOTIFY)
    ret: str | None = None         # -R (RFC 3461 RET: full or hdrs)
    envid: str | None = None       # -V (RFC 3461 ENVID)
    config: str | None = None      # -C


def parse_args(argv: Sequence[str]) -> Options:
    """getopt-style parsing of Postfix's sendmail options (clusters like -ti, values
    attached (-fme@x) or separate (-f me@x)); options Postfix accepts and ignores
    (-o with other letters, -v, -x, -L, -X, -h, -B, -n, -m, -G, -U, -c, -A, -e, -p, -O)
    are accepted and ignored here too."""
    opts = Options()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            opts.recipients += args[i:]
            break
        if not arg.startswith("-") or arg == "-":
            opts.recipients.append(arg)
            continue
        j = 1
        while j < len(arg):
            letter = arg[j]
            j += 1
            if letter == "q":   # -q, or -q<interval> (a queue run interval: we only flush)
                opts.mode = "q"
                break
            if letter in _FLAGS:
                if letter == "t":
                    opts.extract = True
                elif letter == "i":
                    opts.dots_end_input = False
                continue
            if letter not in _WITH_VALUE:
                raise UsageError(f"invalid option -- '{letter}'")
            value = arg[j:]
            if not value:
                if i >= len(args):
                    raise UsageError(f"option requires an argument -- '{letter}'")
                value = args[i]
                i += 1
            _set(opts, letter, value)
            break
    return opts


def _set(opts: Options, letter: str, value: str) -> None:
    if letter in "fr":
        opts.sender = "" if value in ("<>", "") else value.strip("<>")
    elif letter == "F":
        opts.full_name = value
    elif letter == "C":
        opts.config = value
    elif letter == "N":
        opts.notify = value.upper()
    elif letter == "R":
        if value.lower() not in ("full", "hdrs"):
            raise UsageError(f"-R {value}: use full or hdrs")
        opts.ret = value.upper()
    elif letter == "V":
        opts.envid = value
    elif letter == "o":
        if value == "i":                  # -oi: a lone "." does not end input
            opts.dots_end_input = False
    elif letter == "b":
        if value not in ("m", "s", "p"):
            raise UsageError(f"-b{value} is not supported (use -bm, -bs or -bp)")
        opts.mode = value


# ----------------------------------------------------------------------------- the message

def read_message(stream: BinaryIO, dots_end_input: bool) -> bytes:
    """Standard input up to EOF, or (sendmail's default, off with -i) a line holding one '.'."""
    if not dots_end_input:
        return stream.read()
    lines = []
    for line in stream:
        if line.rstrip(b"\r\n") == b".":
            break
        lines.append(line)
    return b"".join(lines)


_FIELD = re.compile(rb"[!-9;-~]+:")   # RFC 5322 §2.2: a field name, then a colon


def _split(data: bytes) -> tuple[list[bytes], bytes]:
    """(header fields with their continuation lines joined, CRLF kept; the body).

    As Postfix's cleanup reads local submissions: the header section ends at the
    empty line, or at the first line that is no header field (``echo text |
    sendmail user`` sends a body only), and the body then starts with that line."""
    fields: list[bytes] = []
    offset = 0
    while offset < len(data):
        end = data.find(b"\r\n", offset)
        end = len(data) if end < 0 else end + 2
        line = data[offset:end]
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif _FIELD.match(line):
            fields.append(line if line.endswith(b"\r\n") else line + b"\r\n")
        else:
            break   # the empty line, or body text: no more header fields
        offset = end
    return fields, data[offset:]


def _name(field_line: bytes) -> str:
    return field_line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()


def prepare(data: bytes, opts: Options, sender: str, hostname: str, now: float,
            queue_hint: str) -> tuple[bytes, list[str]]:
    """The message as it will be queued, and its recipients (-t: from To/Cc/Bcc too)."""
    data = normalize_line_ends(data)
    fields, body = _split(data)
    recipients = list(opts.recipients)
    if opts.extract:
        values = [f.split(b":", 1)[1].decode("utf-8", "replace") for f in fields
                  if _name(f) in ("to", "cc", "bcc") and b":" in f]
        recipients += [addr for _, addr in email.utils.getaddresses([" ".join(v.split()) for v in values]) if addr]
        fields = [f for f in fields if _name(f) != "bcc"]   # a blind copy stays blind
    names = {_name(f) for f in fields}
    added = []
    if "from" not in names:
        added.append(f"From: {email.utils.formataddr((opts.full_name or '', sender))}\r\n".encode())
    if "date" not in names:
        added.append(f"Date: {email.utils.formatdate(now, localtime=True)}\r\n".encode())
    if "message-id" not in names:
        added.append(f"Message-ID: <{time.strftime('%Y%m%d%H%M%S', time.gmtime(now))}.{queue_hint}@{hostname}>\r\n"
                     .encode())
    head = b"".join(fields + added)
    if not body.startswith(b"\r\n"):
        body = b"\r\n" + body
    return head + body, list(dict.fromkeys(recipients))


def default_sender(hostname: str) -> str:
    """The login name at our hostname, as Postfix qualifies it with $myorigin."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        user = str(os.getuid())
    return f"{user}@{hostname}"


# ----------------------------------------------------------------------------- handing it over

def local_listener(config: Config) -> ListenerConfig | None:
    """Where to reach the daemon: the first relay listener (mynetworks lets loopback
    relay), else the first submission listener."""
    for mode in ("relay", "submission"):
        for lc in config.listeners:
            if lc.mode == mode and (lc.tls is None or not lc.tls.implicit):
                return lc
    return None


def _connect_address(lc: ListenerConfig) -> tuple[str, int]:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(lc.host, lc.host)
    return host, lc.port


def submit_smtp(config: Config, lc: ListenerConfig, sender: str, recipients: list[str], data: bytes,
                opts: Options) -> str:
    """Send over SMTP to the daemon; the queue id it answered. ConnectionRefusedError
    when nobody listens; TempFail / Refused for its replies."""
    host, port = _connect_address(lc)
    with smtplib.SMTP(host, port, local_hostname="localhost", timeout=SMTP_TIMEOUT) as smtp:
        smtp.ehlo()
        mail_options = []
        if smtp.has_extn("smtputf8") and not (sender + "".join(recipients)).isascii():
            mail_options.append("SMTPUTF8")
        if smtp.has_extn("dsn"):
            if opts.ret:
                mail_options.append(f"RET={opts.ret}")
            if opts.envid:
                mail_options.append(f"ENVID={_xtext(opts.envid)}")
        rcpt_options = [f"NOTIFY={opts.notify}"] if opts.notify and smtp.has_extn("dsn") else []
        code, text = smtp.mail(sender, mail_options)
        _check(code, text, "MAIL FROM", sender)
        for rcpt in recipients:
            code, text = smtp.rcpt(rcpt, rcpt_options)
            _check(code, text, "RCPT TO", rcpt)
        code, text = smtp.data(data)
        _check(code, text, "DATA", None)
        reply = text.decode("utf-8", "replace")
        return reply.rsplit(" ", 1)[-1] if "queued as" in reply else ""


def _check(code: int, text: bytes, command: str, address: str | None) -> None:
    if 200 <= code < 400:
        return
    reply = f"{code} {text.decode('utf-8', 'replace')}"
    what = f"<{address}>: " if address is not None else ""
    if 400 <= code < 500 or code < 200:
        raise TempFail(f"{what}{command} refused for now: {reply}")
    raise Refused(f"{what}{command} refused: {reply}", EX_DATAERR if command == "RCPT TO" else EX_UNAVAILABLE)


def _xtext(value: str) -> str:
    """RFC 3461 §4: xtext (+XX for '+', '=' and anything outside ! .. ~)."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in value)


async def enqueue_directly(config: Config, message: NewMessage) -> None:
    """Commit to the queue file as the daemon would (the daemon delivers it when it starts)."""
    from mta.store.factory import make_store  # only on this path: the SMTP path stays light

    store = make_store(config, role="sendmail")
    await store.open()
    try:
        await store.queue.enqueue(message)
    finally:
        await store.close()


def queue_writable(path: str) -> bool:
    """True when we may write the queue file, as its owner. Root becomes that owner
    first (as Postfix's setgid postdrop writes as the mail system): SQLite's -wal and
    -shm files made by root would lock the daemon's own user out of its queue."""
    try:
        st = os.stat(path)
    except OSError:
        return False   # no queue yet: the daemon has never run, leave its creation to it
    if os.getuid() == 0 and st.st_uid != 0:
        os.setgid(st.st_gid)
        os.setuid(st.st_uid)
    directory = os.path.dirname(os.path.abspath(path))
    return os.access(path, os.R_OK | os.W_OK) and os.access(directory, os.W_OK | os.X_OK)


# ----------------------------------------------------------------------------- -bs

def smtp_on_stdio(config: Config) -> int:
    """-bs: a proxy between standard input/output and the daemon's listener, so the
    session is the daemon's own (its replies, its checks)."""
    lc = local_listener(config)
    try:
        if lc is None:
            raise OSError("no relay or submission listener configured")
        sock = socket.create_connection(_connect_address(lc), timeout=SMTP_TIMEOUT)
    except OSError as exc:
        sys.stdout.write(f"421 4.3.0 {config.hostname} mail system unavailable: {exc}\r\n")
        sys.stdout.flush()
        return EX_TEMPFAIL
    stdin_fd, stdout = sys.stdin.fileno(), sys.stdout.buffer
    with sock:
        sock.settimeout(None)
        sock_fd = sock.fileno()
        inputs = [sock_fd, stdin_fd]
        wait = config.limits.idle_timeout + 60
        while True:
            ready, _, _ = select.select(inputs, [], [], wait)
            if not ready:   # idle, or the replies after end of input have all come
                return EX_OK if stdin_fd not in inputs else EX_TEMPFAIL
            if sock_fd in ready:
                chunk = sock.recv(65536)
                if not chunk:
                    return EX_OK
                stdout.write(chunk)
                stdout.flush()
            if stdin_fd in ready:
                chunk = os.read(stdin_fd, 65536)
                if chunk:
                    sock.sendall(chunk)
                else:
                    # End of input: a half-close would make the daemon drop the replies still
                    # owed (as to a client that went away), so keep reading them until the
                    # daemon closes after QUIT, or nothing more comes for a while.
                    inputs, wait = [sock_fd], EOF_LINGER


# ----------------------------------------------------------------------------- main

def _config(opts: Options) -> tuple[Config, str | None]:
    path = opts.config or os.environ.get("MTA_CONFIG") or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    return load_config(path), path


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(argv)
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        print(f"usage: {PROG} [-t] [-i] [-f sender] [-F name] [-bs|-bp|-q] [--] recipient...", file=sys.stderr)
        return EX_USAGE
    try:
        config, path = _config(opts)
    except ConfigError as exc:
        print(f"{PROG}: config: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    if opts.mode in ("p", "q"):
        from mta.cli import main as mta_main
        args = ["queue", "list"] if opts.mode == "p" else ["queue", "flush"]
        return mta_main(args + (["--config", path] if path else []))
    if opts.mode == "s":
        return smtp_on_stdio(config)
    try:
        return _send(opts, config)
    except TempFail as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    except Refused as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return EX_TEMPFAIL


def _send(opts: Options, config: Config) -> int:
    from mta.store.api import new_queue_id

    now = time.time()
    queue_id = new_queue_id()
    sender = opts.sender if opts.sender is not None else default_sender(config.hostname)
    raw = read_message(sys.stdin.buffer, opts.dots_end_input)
    data, recipients = prepare(raw, opts, sender or default_sender(config.hostname), config.hostname, now,
                               queue_id)
    if not recipients:
        print(f"{PROG}: no recipients: give them as arguments, or use -t with To:, Cc: or Bcc:", file=sys.stderr)
        return EX_DATAERR
    lc = local_listener(config)
    if lc is not None:
        try:
            submit_smtp(config, lc, sender, recipients, data, opts)
            return EX_OK
        except (ConnectionRefusedError, FileNotFoundError):
            pass   # the daemon is down: queue it ourselves
        except (OSError, smtplib.SMTPException) as exc:
            raise TempFail(f"cannot hand the message to the daemon at {lc.address}: {exc}") from None
    # A shared database (queue.backend: postgresql) is written with the config's
    # credentials, whoever runs sendmail: there is no file whose owner to become.
    if config.queue.backend == "sqlite" and not queue_writable(config.queue.path):
        where = f"nothing listens on {lc.address}" if lc is not None else "no relay listener is configured"
        raise TempFail(f"mail system unavailable: {where}, and the queue {config.queue.path} cannot be written "
                       f"by uid {os.getuid()}")
    stamp = email.utils.formatdate(now, localtime=False)
    received = (f"Received: by {config.hostname} (mta sendmail, from userid {os.getuid()})\r\n"
                f"\tid {queue_id}; {stamp}\r\n").encode()
    message = NewMessage(
        id=queue_id, sender=sender, data=received + data, arrival=now, client="127.0.0.1", listener="sendmail",
        recipients=tuple(Recipient(address=r, notify=opts.notify) for r in recipients),
        ret=opts.ret, envid=_xtext(opts.envid) if opts.envid else None,
        smtputf8=not (sender + "".join(recipients)).isascii(),
    )
    try:
        asyncio.run(enqueue_directly(config, message))
    except (StoreError, StartupError) as exc:
        where = config.queue.path if config.queue.backend == "sqlite" else "database"
        raise TempFail(f"queue {where}: {exc}") from None
    return EX_OK

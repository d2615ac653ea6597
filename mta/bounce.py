"""Delivery status notifications (RFC 3464), as Postfix's bounce daemon writes them.

Pure: no I/O. :func:`build_dsn` returns the whole notification as bytes, ready
to be queued as a new message from the null sender: CRLF line ends, no line
longer than 998 octets (RFC 5322 §2.1.1), long header fields folded. It is a
``multipart/report; report-type=delivery-status`` (RFC 6522) of three parts:

1. ``text/plain``: Postfix's human-readable explanation;
2. ``message/delivery-status``: the machine-readable per-message and
   per-recipient fields, plus the extension fields ``X-Mta-Queue-ID`` /
   ``X-Mta-Sender`` (RFC 3464 §2.1: extension fields start with "X-"; no
   ``X-Postfix-*`` names, which would claim Postfix wrote them);
3. ``text/rfc822-headers`` with the original's header section, or
   ``message/rfc822`` with the whole original (RET=FULL).

It never raises on odd input: the original is normalised to CRLF (bare CR and
LF become CRLF, NUL bytes are dropped, over-long lines are broken with
CRLF SPACE as Postfix's smtp_line_length_limit does), reply texts lose their
control characters, and every generated line is folded or split to fit.

Addresses that are not ASCII are reported with the ``utf-8`` address type in
its 7-bit ``utf-8-addr-xtext`` form (RFC 6533 §3), so the delivery-status part
stays ASCII; the text part then switches to ``charset=utf-8`` and the message
is labelled ``Content-Transfer-Encoding: 8bit``, as it is when the returned
original contains 8-bit data.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

from mta.message import header_section
from mta.model import Reply, default_enhanced

MAX_LINE = 998          # octets per line, without the CRLF (RFC 5322 §2.1.1)
FOLD_AT = 78            # preferred line length for generated header fields and text
MAX_DIAGNOSTIC = 2000   # characters of a reply text kept in a notification
ACTIONS = ("failed", "delayed", "relayed", "delivered")

SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "relayed": "Successful Mail Delivery Report",
    "delivered": "Successful Mail Delivery Report",
}


@dataclass(frozen=True, slots=True)
class ReportedRecipient:
    """One recipient's entry in a notification."""

    address: str                 # the envelope recipient
    reply: Reply                 # its last reply: Status from reply.enhanced, Diagnostic-Code from str(reply)
    remote_mta: str | None       # host name of the next hop that answered, e.g. "mx1.example.test"
    last_attempt: float          # unix time
    action: str = "failed"       # "failed" | "delayed" | "relayed" | "delivered"
    orcpt: str | None = None     # RFC 3461 ORCPT as received, e.g. "rfc822;bob@example.org"
    will_retry_until: float | None = None   # for "delayed"


def remote_mta_of(relay: str) -> str | None:
    """The host name in an Outcome's relay string, for Remote-MTA.

    'mx1.example.test[127.0.0.2]:25' -> 'mx1.example.test'; 'none' or '' -> None;
    '127.0.0.2[127.0.0.2]:25' -> '127.0.0.2'; '[2001:db8::1]:25' -> '2001:db8::1'.
    """
    relay = _one_line(relay or "").strip()
    if not relay or relay.lower() in ("none", "local"):
        return None   # no remote MTA: we gave up, or delivered into a local mailbox
    name, bracket, rest = relay.partition("[")
    if bracket:
        name = name.strip() or rest.partition("]")[0].strip()
    elif relay.count(":") == 1:
        name = relay.partition(":")[0].strip()   # 'host:25'; a bare IPv6 address is left whole
    return name or None


def build_dsn(*, hostname: str, original_queue_id: str, sender: str, original: bytes, arrival: float,
              recipients: Sequence[ReportedRecipient], now: float, message_id: str,
              ret_full: bool = False, envid: str | None = None,
              size_limit: int | None = None) -> bytes:
    """The notification for ``recipients`` of one original message, as bytes.

    ``ret_full`` returns the whole original (``message/rfc822``) instead of its
    header section (``text/rfc822-headers``). With ``size_limit`` set, a larger
    original is returned as headers only, like Postfix's bounce_size_limit.
    ``envid`` and ORCPT values may be given in their xtext form (RFC 3461 §4).
    """
    hostname = _ascii(_one_line(hostname).replace(" ", "")) or "localhost"
    original = _normalize(original)
    if ret_full and size_limit is not None and len(original) > size_limit:
        ret_full = False
    reports = [_Report.of(r) for r in recipients]
    kind = _dominant(r.action for r in reports)

    text = _text_part(hostname, kind, reports, arrival, now)
    status = _status_part(hostname, original_queue_id, sender, arrival, envid, reports)
    parts = [_notification_part(text), (["Content-Description: Delivery report",
                                         "Content-Type: message/delivery-status"], _encode(status)),
             _returned_part(original, kind, ret_full)]
    eight_bit = any("Content-Transfer-Encoding: 8bit" in headers for headers, _ in parts)
    boundary = _boundary(original_queue_id, hostname, now, [body for _, body in parts])

    headers = [
        _fold("Date", _date(now)),
        _fold("From", f"MAILER-DAEMON@{hostname} (Mail Delivery System)"),
        _fold("Subject", SUBJECTS[kind]),
        _fold("To", _mailbox(sender)),
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
    ]
    if eight_bit:
        headers.append("Content-Transfer-Encoding: 8bit")
    headers.append(_fold("Message-ID", _msg_id(message_id, original_queue_id, hostname, now)))

    out = [_encode("".join(h + "\r\n" for h in headers)), b"\r\nThis is a MIME-encapsulated message.\r\n"]
    for part_headers, body in parts:
        out.append(b"\r\n--" + boundary.encode() + b"\r\n")
        out.append(_encode("".join(h + "\r\n" for h in part_headers)) + b"\r\n")
        out.append(body if not body or body.endswith(b"\r\n") else body + b"\r\n")
    out.append(b"\r\n--" + boundary.encode() + b"--\r\n")
    return b"".join(out)


_Part = tuple[list[str], bytes]   # (MIME part header lines, body bytes)


def _notification_part(text: str) -> _Part:
    """Part 1: the human-readable explanation, 8-bit only when an address needs it."""
    eight_bit = not text.isascii()
    return (["Content-Description: Notification",
             f"Content-Type: text/plain; charset={'utf-8' if eight_bit else 'us-ascii'}"]
            + (["Content-Transfer-Encoding: 8bit"] if eight_bit else []), _encode(text))


def _returned_part(original: bytes, kind: str, ret_full: bool) -> _Part:
    """Part 3: the whole original (RET=FULL, message/rfc822) or its header section."""
    if ret_full:
        returned = original
        description = "Undelivered Message" if kind == "failed" else (
            "Delayed Message" if kind == "delayed" else "Delivered Message")
        returned_type = "message/rfc822"
    else:
        returned = _header_section(original)
        description = "Undelivered Message Headers" if kind == "failed" else (
            "Delayed Message Headers" if kind == "delayed" else "Message Headers")
        returned_type = "text/rfc822-headers"
    return ([f"Content-Description: {description}", f"Content-Type: {returned_type}"]
            + (["Content-Transfer-Encoding: 8bit"] if not returned.isascii() else []), returned)


# ----------------------------------------------------------------------------- per recipient


@dataclass(frozen=True, slots=True)
class _Report:
    """A ReportedRecipient with every field checked and cleaned."""

    address: str
    action: str
    status: str
    diagnostic: str       # "smtp; 550 5.1.1 ..." or "X-mta; ..." (ASCII)
    summary: str          # the reply as the text part shows it
    remote_mta: str | None
    orcpt: str | None
    last_attempt: float
    will_retry_until: float | None

    @classmethod
    def of(cls, r: ReportedRecipient) -> _Report:
        action = r.action if r.action in ACTIONS else "failed"
        reply = r.reply
        code = reply.code if isinstance(reply.code, int) else 0
        enhanced = _one_line(str(reply.enhanced)).strip()
        if not re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", enhanced):
            enhanced = default_enhanced(code) if code // 100 in (2, 4, 5) else \
                {"failed": "5.0.0", "delayed": "4.0.0"}.get(action, "2.0.0")
        remote = r.remote_mta and _ascii(_one_line(r.remote_mta).replace(" ", "")) or None
        text = _trim(_one_line(str(reply.text)))
        whole = _trim(_one_line(str(reply)))
        if remote and code // 100 in (2, 4, 5):
            diagnostic = f"smtp; {_ascii(whole)}"
            summary = f"delivery via {remote}: {whole}" if action in ("relayed", "delivered") \
                else f"host {remote} said: {whole}"
        else:   # no server said this: we did (an RFC 3464 §2.3.6 "X-" diagnostic type of our own,
                # where Postfix writes "X-Postfix": we are not Postfix, and say so)
            diagnostic = f"X-mta; {_ascii(text or whole)}"
            summary = text or whole
        return cls(
            address=_one_line(r.address),
            action=action,
            status=enhanced,
            diagnostic=diagnostic,
            summary=summary,
            remote_mta=remote,
            orcpt=_orcpt(r.orcpt) if r.orcpt else None,
            last_attempt=r.last_attempt,
            will_retry_until=r.will_retry_until,
        )


def _dominant(actions: Iterable[str]) -> str:
    found = set(actions)
    for kind in ("failed", "delayed", "relayed", "delivered"):
        if kind in found:
            return kind
    return "failed"


# ----------------------------------------------------------------------------- part 1: text

_INTRO = {
    "failed": [
        "I'm sorry to have to inform you that your message could not",
        "be delivered to one or more recipients. It's attached below.",
    ],
    "success": [
        "Your message was successfully delivered to the destination(s)",
        "listed below. If the message was delivered to mailbox you will",
        "receive no further notifications. Otherwise you may still receive",
        "notifications of mail delivery errors from other systems.",
    ],
}
_WARNING = [
    "####################################################################",
    "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
    "####################################################################",
]
_ASSISTANCE = [
    "For further assistance, please send mail to postmaster.",
    "",
    "If you do so, please include this problem report. You can",
    "delete your own text from the attached returned message.",
]


def _text_part(hostname: str, kind: str, reports: list[_Report], arrival: float, now: float) -> str:
    present = {r.action for r in reports} or {kind}
    lines = _wrap(f"This is the mail system at host {hostname}.", indent="") + [""]
    if "failed" in present:
        lines += _INTRO["failed"] + [""]
    if "delayed" in present:
        lines += _WARNING + [""]
        hours = max(0, round((_clamp(now) - _clamp(arrival)) / 3600))
        lines.append(f"Your message could not be delivered for {hours} hour(s).")
        until = [_clamp(r.will_retry_until) for r in reports
                 if r.action == "delayed" and r.will_retry_until is not None]
        if until:
            days = max(0.0, round((max(until) - _clamp(arrival)) / 86400, 1))
            lines.append(f"It will be retried until it is {days:g} day(s) old.")
        lines.append("")
    if present & {"failed", "delayed"}:
        lines += _ASSISTANCE + [""]
    if present & {"relayed", "delivered"}:
        lines += _INTRO["success"] + [""]
    lines.append("                   The mail system")
    for r in reports:
        lines += [""] + _wrap(f"<{r.address}>: {r.summary}")
    return "".join(line + "\r\n" for line in lines)


def _wrap(text: str, width: int = FOLD_AT, indent: str = "    ") -> list[str]:
    """Break at spaces near ``width``; continuation lines are indented (as Postfix does)."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        for piece in _split_octets(word, MAX_LINE - len(indent) - 1):
            prefix = indent if lines else ""
            if not current:
                current = prefix + piece
            elif len(current) + 1 + len(piece) <= width:
                current += " " + piece
            else:
                lines.append(current)
                current = indent + piece
    if current:
        lines.append(current)
    return lines


# ----------------------------------------------------------------------------- part 2: delivery-status


def _status_part(hostname: str, queue_id: str, sender: str, arrival: float, envid: str | None,
                 reports: list[_Report]) -> str:
    fields = [
        _fold("Reporting-MTA", f"dns; {hostname}"),
        _fold("X-Mta-Queue-ID", _ascii(_one_line(queue_id)) or "unknown"),
    ]
    if envid:
        fields.append(_fold("Original-Envelope-Id", _ascii(_one_line(_xtext_decode(envid)))))
    fields += [
        _fold("X-Mta-Sender", _typed_address(_one_line(sender))),
        _fold("Arrival-Date", _date(arrival)),
    ]
    blocks = ["".join(f + "\r\n" for f in fields)]
    for r in reports:
        fields = [_fold("Final-Recipient", _typed_address(r.address))]
        if r.orcpt:
            fields.append(_fold("Original-Recipient", r.orcpt))
        fields += [f"Action: {r.action}", f"Status: {r.status}"]
        if r.remote_mta:
            fields.append(_fold("Remote-MTA", f"dns; {r.remote_mta}"))
        fields += [_fold("Diagnostic-Code", r.diagnostic), _fold("Last-Attempt-Date", _date(r.last_attempt))]
        if r.action == "delayed" and r.will_retry_until is not None:
            fields.append(_fold("Will-Retry-Until", _date(r.will_retry_until)))
        blocks.append("".join(f + "\r\n" for f in fields))
    return "\r\n".join(blocks)


def _typed_address(address: str) -> str:
    """'rfc822; bob@example.org', or RFC 6533's 'utf-8; b\\x{F6}b@example.org' when not ASCII."""
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {_utf8_xtext(address)}"


def _utf8_xtext(text: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext: printable ASCII but SP, '\\', '+', '=' as is; the rest \\x{HEX}."""
    return "".join(c if "!" <= c <= "~" and c not in "\\+=" else f"\\x{{{ord(c):X}}}" for c in text)


def _orcpt(orcpt: str) -> str | None:
    """An ORCPT as received ('rfc822;bob+2Bx@example.org') as an Original-Recipient value."""
    addr_type, semicolon, address = _one_line(orcpt).partition(";")
    if not semicolon:
        addr_type, address = "rfc822", addr_type
    addr_type, address = addr_type.strip(), address.strip()
    if not address:
        return None
    if addr_type.lower() == "utf-8":
        # Already RFC 6533 xtext or unitext: keep it, with any 8-bit character as \x{HEX}.
        return "utf-8; " + "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in address)
    address = _one_line(_xtext_decode(address))
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+-]*", addr_type):
        addr_type = "rfc822"
    if address.isascii():
        return f"{addr_type}; {address}"
    return f"utf-8; {_utf8_xtext(address)}"


def _xtext_decode(text: str) -> str:
    """Undo RFC 3461 xtext ('+' and two upper-case hex digits); anything else is left alone."""
    if "+" not in text:
        return text
    raw = re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)
    try:
        return raw.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return raw


# ----------------------------------------------------------------------------- part 3: the original


def _normalize(data: bytes) -> bytes:
    """CRLF line ends only, no NUL, no line over 998 octets (broken with CRLF SPACE)."""
    data = bytes(data or b"").replace(b"\0", b"")
    crlf = data.count(b"\r\n")
    if not (data.count(b"\n") == crlf and data.count(b"\r") == crlf):
        data = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    if len(data) <= MAX_LINE or all(len(line) <= MAX_LINE for line in data.split(b"\r\n")):
        return data
    return b"\r\n".join(_break_line(line) for line in data.split(b"\r\n"))


def _break_line(line: bytes) -> bytes:
    pieces = []
    limit = MAX_LINE
    while len(line) > limit:
        cut = limit
        # Never inside a UTF-8 sequence: back off over continuation bytes.
        while cut > limit - 3 and 0x80 <= line[cut] <= 0xBF:
            cut -= 1
        pieces.append(line[:cut])
        line = line[cut:]
        limit = MAX_LINE - 1   # continuation lines start with a space
    pieces.append(line)
    return b"\r\n ".join(pieces)


def _header_section(data: bytes) -> bytes:
    """Everything up to the first empty line (all of it when there is none), CRLF-terminated."""
    header = header_section(data)
    return header if not header or header.endswith(b"\r\n") else header + b"\r\n"


# ----------------------------------------------------------------------------- building blocks


def _boundary(queue_id: str, hostname: str, now: float, bodies: Sequence[bytes]) -> str:
    """Postfix-style 'QUEUEID.TIME/host', plus randomness; checked against every part."""
    prefix = re.sub(r"[^A-Za-z0-9]", "", queue_id)[:16] or "DSN"
    host = re.sub(r"[^A-Za-z0-9.-]", "", hostname)[:24]
    folded = [body.lower() for body in bodies]
    while True:
        boundary = f"{prefix}.{int(_clamp(now))}.{_token()}/{host}"[:70]
        needle = boundary.lower().encode()
        if not any(needle in body for body in folded):
            return boundary


def _token() -> str:
    return secrets.token_hex(8)


def _date(when: float | None) -> str:
    """An RFC 5322 date-time in UTC; out-of-range or NaN times are clamped."""
    return format_datetime(datetime.fromtimestamp(_clamp(when), UTC))


def _clamp(when: object) -> float:
    """A unix time within what a date can show (1970 to 9999); 0 for NaN and non-numbers."""
    return min(max(_finite(when), 0.0), 253402300799.0)


def _finite(value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def _msg_id(message_id: str, queue_id: str, hostname: str, now: float) -> str:
    mid = re.sub(r"[\s<>]", "", _ascii(_one_line(message_id)))
    if not mid:
        qid = re.sub(r"[^A-Za-z0-9]", "", queue_id) or "DSN"
        mid = f"{int(_clamp(now))}.{qid}@{hostname}"
    return f"<{mid}>"


_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+"
                       r"(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-]+)*")


def _mailbox(address: str) -> str:
    """An envelope address as an RFC 5322 addr-spec, its local part quoted when it has to be."""
    address = _one_line(address).strip()
    if not address:
        return "<>"
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    if not _DOT_ATOM.fullmatch(local):
        local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"{local}@{domain}" if at else local


def _fold(name: str, value: str) -> str:
    """'Name: value', folded at spaces near 78 characters; no line over 998 octets.

    Runs of white space become one space; a word too long for one line is split
    (unfolding then shows a space there).
    """
    lines: list[str] = []
    current = f"{name}:"
    bare = True   # nothing after the colon yet
    for word in value.split():
        for piece in _split_octets(word, MAX_LINE - 1):
            if bare and len(_encode(current)) + 1 + len(_encode(piece)) <= MAX_LINE \
                    or not bare and len(current) + 1 + len(piece) <= FOLD_AT:
                current += " " + piece   # FOLD_AT characters are at most 4 * 78 octets
            else:
                lines.append(current)
                current = "\t" + piece
            bare = False
    lines.append(current)
    return "\r\n".join(lines)


def _split_octets(word: str, limit: int) -> list[str]:
    """``word`` in pieces of at most ``limit`` octets of UTF-8 each."""
    if len(word) * 4 <= limit or len(_encode(word)) <= limit:
        return [word]
    pieces: list[str] = []
    current: list[str] = []
    size = 0
    for char in word:
        n = len(_encode(char))
        if size + n > limit:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(char)
        size += n
    pieces.append("".join(current))
    return pieces


_CONTROLS = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]+")


def _one_line(text: object) -> str:
    """Any text as one line: control characters (CR, LF, TAB, ...) become spaces, runs collapse.

    Lone surrogates (undecodable bytes kept by surrogateescape) become '?'.
    """
    text = str(text or "")
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return " ".join(_CONTROLS.sub(" ", text).split())


def _ascii(text: str) -> str:
    return text if text.isascii() else text.encode("ascii", "replace").decode("ascii")


def _trim(text: str) -> str:
    return text if len(text) <= MAX_DIAGNOSTIC else text[:MAX_DIAGNOSTIC - 3] + "..."


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "replace")


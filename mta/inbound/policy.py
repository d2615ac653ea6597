"""Pure inbound decisions: address checks, relay permission, header edits.

No I/O here, so every rule has a fast unit test. Reply literals used by the
inbound side live in ``REPLIES`` with their enhanced status codes (RFC 3463).
"""

from __future__ import annotations

import email.utils
import functools
import ipaddress
import re
from dataclasses import dataclass

from mta.message import header_bounds
from mta.model import Reply, normalize_line_ends, notify_wants  # noqa: F401 - re-exported for inbound callers

REPLIES = {
    "relay_denied": Reply(554, "5.7.1", "Relay access denied"),
    "bad_rcpt": Reply(553, "5.1.3", "Bad recipient address syntax"),
    "bad_sender": Reply(553, "5.1.7", "Bad sender address syntax"),
    # RFC 6531 §3.4 / RFC 3463 5.6.7: a UTF-8 address needs SMTPUTF8 on MAIL (Postfix's wording).
    "needs_smtputf8": Reply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address"),
    "too_many_rcpts": Reply(452, "4.5.3", "Too many recipients"),
    "too_big": Reply(552, "5.3.4", "Message too big"),
    "too_many_hops": Reply(554, "5.4.6", "Too many hops (mail loop?)"),
    # RFC 5322 §2.3 / RFC 5321 §2.3.8: NUL is not text. A next hop that drops NULs
    # would read <CRLF><NUL>.<CRLF> as the end of data (SMTP smuggling), and removing
    # them would change a message we then pass on as the sender's: refuse it whole.
    "nul_in_data": Reply(554, "5.6.0", "Message content rejected: NUL character in message"),
    "store_failed": Reply(451, "4.3.0", "Error: queue file write error"),
    "disk_full": Reply(452, "4.3.1", "Insufficient system storage"),
    # Postfix's wording for an address at a local domain with no mailbox (local_recipient_maps).
    "unknown_user": Reply(550, "5.1.1", "Recipient address rejected: User unknown in local recipient table"),
    "sender_ok": Reply(250, "2.1.0", "Ok"),
    "rcpt_ok": Reply(250, "2.1.5", "Ok"),
    "idle_timeout": Reply(421, "4.4.2", "Error: timeout exceeded"),
    "too_many_connections": Reply(421, "4.7.0", "Error: too many connections"),
    "too_many_errors": Reply(421, "4.7.0", "Error: too many errors"),   # sent with our hostname
    "local_error": Reply(451, "4.3.0", "Error: local error in processing"),
}

# RFC 5321 §4.1.2 Domain, or an address literal such as [192.0.2.1] / [IPv6:::1].
_DOMAIN = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                     r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")
# No control characters in a U-label either (NUL passed before: found by tests/test_adversarial.py).
_UTF8_DOMAIN = re.compile(r"(?=.{1,253}$)[^\s\x00-\x1f\x7f@.\[\]]+(?:\.[^\s\x00-\x1f\x7f@.\[\]]+)*\.?")
_FORBIDDEN = re.compile(r"[\r\n\x00]")


def valid_domain(domain: str, smtputf8: bool = False) -> bool:
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if literal[:5].lower() == "ipv6:":
            literal = literal[5:]
            if "%" in literal:
                return False  # a zone id ("fe80::1%eth0", any text) is no RFC 5321 address literal
            try:
                return ipaddress.ip_address(literal).version == 6
            except ValueError:
                return False
        try:
            return ipaddress.ip_address(literal).version == 4
        except ValueError:
            return False
    if _DOMAIN.fullmatch(domain):
        return True
    return smtputf8 and _UTF8_DOMAIN.fullmatch(domain) is not None


def split_address(address: str) -> tuple[str, str] | None:
    """(local part, domain) of a mailbox, or None when it is not local@domain."""
    if _FORBIDDEN.search(address) or len(address) > 254:
        return None
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain or len(local) > 64 and not local.startswith('"'):
        return None
    return local, domain


def check_sender(address: str, smtputf8: bool = False) -> Reply | None:
    """None when the reverse-path is acceptable; the refusal otherwise."""
    if address == "":
        return None  # the null reverse-path <> (RFC 5321 §4.5.5: bounces)
    if "@" not in address:
        # A sender without a domain (<root>, <host!user>) is accepted as Postfix does
        # (no reject_non_fqdn_sender by default); the handler qualifies it with our
        # hostname (append_at_myorigin). RCPT still decides who may relay.
        if _FORBIDDEN.search(address) or len(address) > 64:
            return REPLIES["bad_sender"]
        return None if smtputf8 or address.isascii() else REPLIES["needs_smtputf8"]
    parts = split_address(address)
    if parts is None or not valid_domain(parts[1], smtputf8 or not parts[1].isascii()):
        return REPLIES["bad_sender"]
    if not smtputf8 and not address.isascii():
        return REPLIES["needs_smtputf8"]
    return None


# Local parts that ask the receiving host to route the mail onward: the
# percent hack (user%remote@us), bang paths (remote!user@us) and a quoted
# "user@remote"@us. An untrusted client may not use them even for our own
# relay_domains, or we would forward to an arbitrary host (open relay).
_ROUTING_LOCAL = re.compile(r"[%!@]")


def check_recipient(address: str, *, trusted: bool, relay_domains: tuple[str, ...],
                    smtputf8: bool = False) -> Reply | None:
    """None when we accept this RCPT; the refusal otherwise.

    ``trusted``: the client is in mynetworks or authenticated, so it may relay
    anywhere. Anyone else may only send to a domain in relay_domains.
    """
    parts = split_address(address)
    if not trusted and (parts is None or parts[1].lower().rstrip(".") not in relay_domains
                        or _ROUTING_LOCAL.search(parts[0])):
        # Relay permission comes before syntax: for an untrusted client anything that
        # is not a plain local@relay_domain is 554 5.7.1, however it is spelt (a quoted
        # "user@remote" without a domain, a bare user, a source route, ...).
        return REPLIES["relay_denied"]
    if parts is None:
        return REPLIES["bad_rcpt"]
    local, domain = parts
    if not valid_domain(domain, smtputf8 or not domain.isascii()):
        return REPLIES["bad_rcpt"]
    if not smtputf8 and not address.isascii():
        return REPLIES["needs_smtputf8"]
    return None


# ----------------------------------------------------------------------------- message bytes

@dataclass(frozen=True, slots=True)
class HeaderFacts:
    received_count: int
    has_message_id: bool
    has_date: bool
    header_end: int  # offset where the header section ends (see mta.message.header_bounds)


def inspect_headers(data: bytes) -> HeaderFacts:
    """Read the header section only (RFC 5322 §2.2), without a MIME parse."""
    end = header_bounds(data)[0]
    names = [line.split(b":", 1)[0].strip().lower()
             for line in data[:end].split(b"\r\n") if line and line[:1] not in (b" ", b"\t")]
    return HeaderFacts(
        received_count=names.count(b"received"),
        has_message_id=b"message-id" in names,
        has_date=b"date" in names,
        header_end=end,
    )


def add_headers(data: bytes, facts: HeaderFacts, lines: list[bytes]) -> bytes:
    """Append header lines at the end of the header section."""
    if not lines:
        return data
    extra = b"".join(line + b"\r\n" for line in lines)
    if facts.header_end < len(data):
        # The empty line follows (at 0: no header section at all): insert before it.
        return data[:facts.header_end] + extra + data[facts.header_end:]
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"  # all headers, no body
    return data + extra


def protocol_name(esmtp: bool, tls: bool, auth: bool, smtputf8: bool) -> str:
    """The 'with' clause of Received: (RFC 3848, RFC 6531 §3.7.3)."""
    if not esmtp:
        return "SMTP"
    name = ("UTF8SMTP" if smtputf8 else "ESMTP") + ("S" if tls else "") + ("A" if auth else "")
    return name


def received_header(*, helo: str, client_ip: str, hostname: str, listener: str, protocol: str,
                    queue_id: str, recipients: list[str], now: float, client_name: str = "unknown") -> bytes:
    """RFC 5321 §4.4 trace header, in Postfix's layout: the HELO name, then the
    client's verified reverse-DNS name (or "unknown") and address."""
    helo_text = re.sub(r"[^\x21-\x7e]", "?", helo) or "unknown"
    line = (f"Received: from {helo_text} ({client_name} [{client_ip}])\r\n"
            f"\tby {hostname} (mta) with {protocol} id {queue_id}\r\n"
            f"\t(listener {listener})")
    if len(recipients) == 1:
        line += f"\r\n\tfor <{recipients[0]}>"
    line += f"; {rfc5322_date(now)}\r\n"
    return line.encode("utf-8", "surrogateescape")


def message_id_header(queue_id: str, hostname: str, now: float) -> bytes:
    stamp = rfc5322_date(now).replace(" ", "").replace(",", "").replace(":", "")
    return f"Message-ID: <{stamp}.{queue_id}@{hostname}>".encode()


def date_header(now: float) -> bytes:
    return f"Date: {rfc5322_date(now)}".encode()


@functools.lru_cache(maxsize=4)
def _date_of_second(second: int) -> str:
    return email.utils.formatdate(second, localtime=False)


def rfc5322_date(now: float) -> str:
    """RFC 5322 §3.3 date-time (UTC), made once per second: every message's
    Received: line needs one, and formatdate is slow."""
    return _date_of_second(int(now))


# ----------------------------------------------------------------------------- RFC 3461 DSN parameters

_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
# RFC 5322 3.2.3 atext, one or more: an atom.
ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# RFC 3461 4.2: addr-type = atom, e.g. "rfc822" or "utf-8".
_ATOM = re.compile(ATEXT)
_NOTIFY_WORDS = {"SUCCESS", "FAILURE", "DELAY"}


@dataclass(frozen=True, slots=True)
class DSNParams:
    ret: str | None = None       # FULL | HDRS
    envid: str | None = None     # xtext, kept encoded
    notify: str | None = None    # NEVER | comma list of SUCCESS, FAILURE, DELAY
    orcpt: str | None = None     # addr-type;xtext, kept as given


def split_dsn_params(params: list[str], allowed: tuple[str, ...]) -> tuple[DSNParams, list[str]] | Reply:
    """Take RFC 3461 parameters out of a MAIL or RCPT parameter list.

    Returns the DSN values and the other parameters (left for aiosmtpd), or
    the 501 refusal for a malformed or repeated one.
    """
    found: dict[str, str] = {}
    rest: list[str] = []
    for param in params:
        name, eq, value = param.partition("=")
        key = name.upper()
        if key not in allowed:
            rest.append(param)
            continue
        if key in found or not eq or not value:
            return Reply(501, "5.5.4", f"Bad {key} parameter")
        found[key] = value
    ret = found.get("RET")
    if ret is not None:
        ret = ret.upper()
        if ret not in ("FULL", "HDRS"):
            return Reply(501, "5.5.4", "Bad RET parameter (FULL or HDRS)")
    envid = found.get("ENVID")
    if envid is not None and (len(envid) > 100 or not _XTEXT.fullmatch(envid)):
        return Reply(501, "5.5.4", "Bad ENVID parameter")
    notify = found.get("NOTIFY")
    if notify is not None:
        words = notify.upper().split(",")
        if not (words == ["NEVER"] or (set(words) <= _NOTIFY_WORDS and len(set(words)) == len(words))):
            return Reply(501, "5.5.4", "Bad NOTIFY parameter (NEVER, or SUCCESS, FAILURE, DELAY)")
        notify = ",".join(words)
    orcpt = found.get("ORCPT")
    if orcpt is not None:
        addr_type, semi, xtext = orcpt.partition(";")
        if not semi or not _ATOM.fullmatch(addr_type) or not _XTEXT.fullmatch(xtext) or len(orcpt) > 500:
            return Reply(501, "5.5.4", "Bad ORCPT parameter")
    return DSNParams(ret=ret, envid=envid, notify=notify, orcpt=orcpt), rest

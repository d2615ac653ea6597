"""POP3 reply literals and framing, kept in one place.

Every reply is one status line, ``+OK`` or ``-ERR`` (RFC 1939 §3); a
multi-line reply follows it with lines ended by a line holding only ".".
Response codes in brackets come from RFC 2449 §8 ([IN-USE], [LOGIN-DELAY])
and RFC 3206 ([SYS/TEMP], [SYS/PERM], [AUTH]); CAPA announces that we send
them (RESP-CODES, AUTH-RESP-CODE).
"""

from __future__ import annotations

from collections.abc import Iterable

CRLF = b"\r\n"


def ok(text: str = "") -> bytes:
    return (f"+OK {text}" if text else "+OK").encode() + CRLF


def err(text: str) -> bytes:
    return f"-ERR {text}".encode() + CRLF


def multiline(status: str, lines: Iterable[str]) -> bytes:
    """``+OK status``, the lines, then the terminating "." (RFC 1939 §3).

    Only for lines we compose ourselves (listings, capabilities), which never
    start with "."; message text goes through :func:`stuff` instead."""
    return ok(status) + b"".join(line.encode() + CRLF for line in lines) + b"." + CRLF


def stuff(data: bytes) -> bytes:
    """Message text as sent in RETR/TOP: byte-stuffed and terminated (RFC 1939 §3).

    A line that starts with "." gets another "." in front, so the client never
    mistakes it for the end; a message whose last line lacks its CRLF gets one,
    so the terminating "." stands on a line of its own. Stored messages use CRLF;
    a stray bare LF is still treated as a line end here, as clients would."""
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\n.", b"\n..")
    if data and not data.endswith(CRLF):
        data += CRLF
    return data + b"." + CRLF


# ------------------------------------------------------------------ fixed replies

def greeting(hostname: str) -> bytes:
    # No APOP timestamp (RFC 1939 §7): passwords are stored as scrypt hashes,
    # and APOP needs the clear-text secret on the server to compute its digest.
    return ok(f"{hostname} POP3 server ready")


def signing_off(hostname: str, detail: str = "") -> bytes:
    return ok(f"{hostname} POP3 server signing off" + (f" ({detail})" if detail else ""))


UNKNOWN_COMMAND = err("unknown command")
LINE_TOO_LONG = err("line too long")
NUL_IN_COMMAND = err("NUL characters are not allowed in commands")
NOT_UTF8 = err("command is not valid UTF-8")
NO_SUCH_MESSAGE = err("no such message")
BAD_MESSAGE_NUMBER = err("invalid message number")
NOOP = ok()

# Authorization (RFC 1939 §7, RFC 5034, RFC 3206 [AUTH]).
USER_ACCEPTED = ok("send PASS")
MISSING_USER_NAME = err("USER needs a user name")
PASS_WITHOUT_USER = err("PASS must follow a successful USER")
MISSING_PASSWORD = err("PASS needs a password")
AUTH_FAILED = err("[AUTH] authentication failed")
AUTH_FAILED_CLOSING = err("[AUTH] authentication failed; too many failures, closing connection")
AUTH_CANCELLED = err("authentication cancelled")
AUTH_BAD_BASE64 = err("invalid base64 in authentication response")
AUTH_BAD_PLAIN = err("malformed PLAIN response (authzid NUL authcid NUL password)")
AUTH_RESPONSE_TOO_LONG = err("authentication response too long")
AUTH_UNSUPPORTED = err("unsupported authentication mechanism; only PLAIN is offered")
AUTH_SYNTAX = err("AUTH needs a mechanism name")
AUTH_CONTINUE = b"+ " + CRLF   # RFC 5034 §4: empty challenge for PLAIN
PLAINTEXT_NEEDS_STLS = err("[AUTH] plaintext authentication disallowed without TLS; use STLS first")
PLAINTEXT_NEEDS_TLS = err("[AUTH] plaintext authentication disallowed without TLS")
APOP_UNSUPPORTED = err("APOP is not supported (passwords are stored hashed); use USER/PASS or AUTH PLAIN")
IN_USE = err("[IN-USE] mailbox is locked by another POP3 session")
TEMP_AUTH_FAILURE = err("[SYS/TEMP] temporary authentication failure; try again later")
MAILDROP_UNAVAILABLE = err("[SYS/TEMP] cannot open the mailbox now; try again later")

# STLS (RFC 2595 §4).
BEGIN_TLS = ok("Begin TLS negotiation")
TLS_ALREADY_ACTIVE = err("TLS is already active")
TLS_NOT_AVAILABLE = err("STLS is not available on this listener")

# Session ends the client did not ask for.
IDLE_TIMEOUT = err("autologout; idle too long")
SHUTTING_DOWN = err("[SYS/TEMP] server shutting down")
TOO_MANY_CONNECTIONS = err("[SYS/TEMP] too many connections")
INTERNAL_ERROR = err("[SYS/TEMP] internal server error")
DELETE_FAILED = err("[SYS/TEMP] some deleted messages not removed; they are kept, try again later")

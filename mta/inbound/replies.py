"""What aiosmtpd writes on its own, made fit for an MTA: its replies and its log lines.

aiosmtpd 1.4.6 answers many errors without an enhanced status code
(``500 Error: bad syntax``, ``552 Error: Too much mail data``): :func:`enhance_reply`
adds the RFC 3463 code a reply lacks (InboundSMTP.push sends every reply through
it). Its log ("mail.log") repeats what clients send, credentials included: the
filter installed here keeps such text out of the log.
"""

from __future__ import annotations

import logging
import re

_HAS_ENHANCED = re.compile(rb"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?:[ \r]|$)")
# Generic codes for replies aiosmtpd sends without one (RFC 3463 §3.3 / RFC 5321 §4.2).
_DEFAULT_ENHANCED = {
    b"221": b"2.0.0", b"235": b"2.7.0", b"250": b"2.0.0", b"251": b"2.1.5", b"252": b"2.5.0",
    b"421": b"4.7.0", b"432": b"4.7.12", b"451": b"4.3.0", b"452": b"4.3.1", b"454": b"4.7.0",
    b"500": b"5.5.2", b"501": b"5.5.4", b"502": b"5.5.1", b"503": b"5.5.1", b"504": b"5.5.4",
    b"530": b"5.7.0", b"534": b"5.7.9", b"535": b"5.7.8", b"538": b"5.7.11", b"550": b"5.0.0",
    b"552": b"5.3.4", b"553": b"5.1.3", b"554": b"5.0.0", b"555": b"5.5.4",
}
# Specific aiosmtpd literals that deserve a more precise code or wording.
_REWRITES = {
    b"552 Error: Too much mail data": b"552 5.3.4 Message too big",
    b"500 Command line too long": b"500 5.5.2 Error: line too long",
    b"500 Line too long (see RFC5321 4.5.3.1.6)": b"500 5.5.2 Error: line too long (RFC 5321 4.5.3.1.6)",
    b"220 Ready to start TLS": b"220 2.0.0 Ready to start TLS",
}
_UNRECOGNISED = re.compile(rb'^500 Error: command ".*" not recognized$')


def default_enhanced(code: int) -> str:
    """The generic RFC 3463 code for a reply ``code`` of ours that has no more precise one:
    the one in the table above, else class.0.0 ("other or undefined", RFC 3463 §3.1)."""
    enhanced = _DEFAULT_ENHANCED.get(str(code).encode())
    return enhanced.decode() if enhanced is not None else f"{code // 100}.0.0"


def enhance_reply(raw: bytes) -> bytes:
    """Add the enhanced status code (RFC 3463) that an aiosmtpd reply lacks."""
    if raw in _REWRITES:
        return _REWRITES[raw]
    if _HAS_ENHANCED.match(raw):
        return raw
    if _UNRECOGNISED.match(raw):
        return b"500 5.5.1 Error: command not recognized"
    code, sep = raw[:3], raw[3:4]
    enhanced = _DEFAULT_ENHANCED.get(code)
    if enhanced is None or sep not in (b" ", b"-", b""):
        return raw
    return code + (sep or b" ") + enhanced + b" " + raw[4:]


# aiosmtpd ("mail.log") logs the text clients send: every command line (INFO and
# DEBUG), an unrecognised command word (WARNING, which the daemon keeps) and an
# AUTH response that is not base64 (DEBUG). It only masks "AUTH <mech> <response>",
# so the base64 credentials of a client that sends its AUTH responses blindly
# (after a 503/504/538, or pipelined) and a password sent unencoded were logged.
# This filter logs such text as its length only; known commands stay readable.
_KNOWN_COMMAND = re.compile(rb"(?i)(?:HELO|EHLO|MAIL|RCPT|DATA|RSET|NOOP|QUIT|VRFY|EXPN|HELP|AUTH|STARTTLS)(?:[ \r\n]|$)")
_CLIENT_TEXT_RECORDS = {"%r >> %r", "_handle_client readline: %r", "%r unrecognised: %s",
                        "%r can't decode base64: %s"}


# aiosmtpd warns about our own choices on every session: AUTH without TLS where the operator
# allowed it (allow_insecure_auth), and its own use of the deprecated Session.login_data.
_NOISE = ("auth_required == True but auth_require_tls == False",
          "Session.login_data is deprecated and will be removed in version 2.0")


def _redact_client_text(record: logging.LogRecord) -> bool:
    if record.msg in _NOISE:
        return False
    if record.msg in _CLIENT_TEXT_RECORDS and isinstance(record.args, tuple) and record.args:
        text = record.args[-1]
        raw = text if isinstance(text, bytes) else str(text).encode("utf-8", "surrogateescape")
        if not (record.msg.endswith(">> %r") or record.msg.endswith("readline: %r")) \
                or not _KNOWN_COMMAND.match(raw):
            record.args = (*record.args[:-1], f"<{len(raw)} bytes not logged>")
    return True


# Installed on import: InboundSMTP imports this module, so it is in place before any session.
logging.getLogger("mail.log").addFilter(_redact_client_text)

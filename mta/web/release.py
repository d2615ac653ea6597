"""``POST /api/v1/message/{ID}/release``: send a lab message on, through mta's own queue.

Mailpit's request and answers: the body ``{"To": ["a@example.com", ...]}``;
200 ``ok``; 404 for an unknown ID (``latest`` names the newest entry); 400 with
a one-line reason for a body that is not that JSON, no recipients, an address
that is not one, or a recipient refused. Unlike Mailpit, which hands the
message to an SMTP server once and only logs a failure, the message is
enqueued as a new message (committed before the 200, like the 250 of SMTP):
the queue manager delivers it with retries, and it bounces when it fails.

What is sent (and why):

* the bytes of the entry as the API's ``raw`` serves them, without local
  delivery's per-recipient trace fields (Return-Path, X-Original-To,
  Delivered-To: the final delivery's, RFC 5321 §4.4), and with a
  Received field of its own on top, as for any mail entering the queue,
  saying it came over HTTP and from which entry. Unlike Mailpit, Date,
  Message-ID and Bcc are left as they are: the release is the message the
  system under test sent, relayed (as ``postsuper -r`` would), not a new one.
* the envelope sender is the original envelope sender -- the Return-Path
  local delivery recorded -- so that a bounce goes where a bounce of the
  original would have gone (``<>`` stays ``<>``). Mailpit uses the From (or
  Sender) address or a configured ReturnPath instead; it has no envelope.

The relay rules are those of RCPT on an SMTP listener (mta/inbound/policy.py):
a client in ``mynetworks``, or one that passed the listener's basic auth (the
HTTP counterpart of SMTP AUTH), may release to anywhere; anyone else only to
``relay_domains`` and the local domains. An address at a local domain needs a
mailbox (``mailboxes.users_file``), and ``postmaster@`` goes to the postmaster.
"""

from __future__ import annotations

import dataclasses
import email.utils
import logging
import re
import time
from typing import Any

from aiohttp import web

from mta.config import Config
from mta.errors import StoreError
from mta.inbound import policy
from mta.inbound.policy import REPLIES
from mta.mailbox.users import MailboxUsers
from mta.model import NewMessage, Recipient, normalize_line_ends
from mta.passwords import UsersFileUnavailable
from mta.store.api import new_queue_id
from mta.web.app import CONTEXT, ApiError, WebContext, bad_request, text_response
from mta.web.auth import parse_basic
from mta.web.mailpit_api import entry_and_raw, read_body

log = logging.getLogger("mta.web")
# The line that takes a message into the queue, under Postfix's name for that step
# (as mta/inbound/handler.py logs it): log parsers count it as received mail.
queue_log = logging.getLogger("mta.cleanup")

RELEASE_PATH = "/api/v1/message/{id}/release"
LISTENER_NAME = "http"      # the listener= of a released message, for its log lines and metrics

_RETURN_PATH = re.compile(rb"Return-Path:[ \t]*<([^>\r\n]*)>[ \t]*\r\n", re.IGNORECASE)


@dataclasses.dataclass(frozen=True, slots=True)
class Release:
    """A checked request: the entry, the envelope and who asked."""

    entry_id: str
    recipients: tuple[Recipient, ...]
    client_ip: str
    user: str | None


async def release(request: web.Request) -> web.Response:
    context = request.app[CONTEXT]
    entry, raw = await entry_and_raw(request)       # 404 first, as Mailpit checks the ID first
    to = _to_of(await read_body(request))
    user = _user(context, request)
    client_ip = request.remote or ""
    recipients = _check_recipients(context, to, trusted=user is not None or context.config.in_mynetworks(client_ip))
    message = _new_message(context.config, Release(entry.id, recipients, client_ip, user), raw)
    if policy.inspect_headers(message.data).received_count > context.config.limits.max_hops:
        raise bad_request(REPLIES["too_many_hops"].text)   # as at the end of DATA: a loop
    try:
        await context.store.queue.enqueue(message)
    except StoreError as exc:
        log.error("%s: release of inbox entry %s failed: queue write failed: %s", message.id, entry.id, exc)
        # The queue's own answer, as SMTP would give it (452 4.3.1 / 451 4.3.0): try again later.
        reason = REPLIES["disk_full"] if exc.disk_full else REPLIES["store_failed"]
        raise ApiError(507 if exc.disk_full else 503, str(reason)) from None
    log.info("%s: released from inbox by http: entry=%s, client=%s%s, to=%s", message.id, entry.id,
             client_ip, f", user={user}" if user else "", ",".join(f"<{r.address}>" for r in recipients))
    queue_log.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", message.id, message.sender,
                   len(message.data), len(message.recipients))
    response = text_response(200, "ok", "text/plain")
    response.headers["X-Queue-Id"] = message.id    # ours: where the log and `mta queue` find it
    return response


def _to_of(body: dict[str, Any]) -> list[str]:
    """The ``To`` list of Mailpit's body (keys without regard to case, as Go decodes
    them: mailpit_api.read_body); 400 with the reason otherwise."""
    to = body.get("to")
    if to is None or to == []:
        raise bad_request("No valid addresses found")
    if not isinstance(to, list) or not all(isinstance(item, str) for item in to):
        raise bad_request("To must be an array of strings")
    return to


def _user(context: WebContext, request: web.Request) -> str | None:
    """The basic-auth user (the middleware has checked the password), or None."""
    if not context.listener.users_file:
        return None
    credentials = parse_basic(request.headers.get("Authorization"))
    return credentials[0] if credentials is not None else None


def _check_recipients(context: WebContext, to: list[str], *, trusted: bool) -> tuple[Recipient, ...]:
    """RCPT's rules for each address; the first refusal is the 400's reason."""
    config = context.config
    if len(to) > config.limits.max_recipients:
        raise bad_request(f"Too many recipients: {len(to)} (limits.max_recipients: {config.limits.max_recipients})")
    users = _mailbox_users(context)
    recipients: list[Recipient] = []
    for given in to:
        address = _address(given)
        postmaster = config.postmaster_for(address)
        if postmaster is not None:   # RFC 5321 §4.5.1, as at RCPT
            recipients.append(Recipient(address=postmaster, orcpt=f"rfc822;{address}"))
            continue
        refusal = policy.check_recipient(address, trusted=trusted,
                                         relay_domains=config.relay_domains + config.local_domains
                                         + config.mydestination, smtputf8=True)
        if refusal is not None:
            raise bad_request(f"<{address}>: {refusal.text}")
        try:
            if users.is_local(address) and not users.exists(address):
                raise bad_request(f"<{address}>: {REPLIES['unknown_user'].text}")
        except UsersFileUnavailable as exc:
            raise ApiError(503, f"<{address}>: Temporary lookup failure ({exc})") from None
        recipients.append(Recipient(address=address))
    return tuple(recipients)


def _address(given: str) -> str:
    """The addr-spec of ``a@b`` or ``Name <a@b>``; 400 as Mailpit words it if there is none."""
    if any(c in given for c in "\r\n\x00"):
        raise bad_request(f"Invalid email address: {given!r}")
    found = email.utils.getaddresses([given])
    address = found[0][1] if len(found) == 1 else ""
    if not address or "@" not in address or policy.split_address(address) is None:
        raise bad_request(f"Invalid email address: {given}")
    return address


def _mailbox_users(context: WebContext) -> MailboxUsers:
    """Who has a lab mailbox (local_recipient_maps), read once per application and kept
    fresh by the users file's own change check."""
    users = context.extras.get("release.mailbox_users")
    if not isinstance(users, MailboxUsers):
        users = MailboxUsers(context.config, health=context.health)
        context.extras["release.mailbox_users"] = users
    return users


def _new_message(config: Config, release: Release, raw: bytes) -> NewMessage:
    """The queue's new message: a Received field of ours, then the entry's bytes
    (``raw``: as the API serves them) without their Return-Path."""
    now = time.time()
    queue_id = new_queue_id()
    sender, body = split_return_path(normalize_line_ends(raw))
    addresses = [r.address for r in release.recipients]
    data = _received(config.hostname, release, queue_id, addresses, now) + body
    head = data[:policy.inspect_headers(data).header_end]
    return NewMessage(
        id=queue_id, sender=sender, recipients=release.recipients, data=data, arrival=now,
        client=release.client_ip, listener=LISTENER_NAME, helo="", auth_user=release.user,
        # RFC 6531: SMTPUTF8 is needed when an address or a header field is UTF-8;
        # RFC 6152: 8BITMIME when any octet has its high bit set.
        smtputf8=not (sender + "".join(addresses)).isascii() or not head.isascii(),
        body_8bit=not data.isascii(),
    )


def split_return_path(message: bytes) -> tuple[str, bytes]:
    """(the envelope sender, the message without it): the Return-Path local delivery
    put on top. It goes: RFC 5321 §4.4, a message sent on SHOULD NOT carry one (the
    next final delivery adds its own)."""
    found = _RETURN_PATH.match(message)
    if found is None:
        return "", message
    return found.group(1).decode("utf-8", "surrogateescape"), message[found.end():]


def _received(hostname: str, release: Release, queue_id: str, recipients: list[str], now: float) -> bytes:
    """RFC 5321 §4.4's trace field for the release: by whom, how (HTTP), from which entry."""
    line = (f"Received: from [{release.client_ip or 'unknown'}]\r\n"
            f"\tby {hostname} (mta) with HTTP id {queue_id}\r\n"
            f"\t(released from inbox entry {release.entry_id})")
    if len(recipients) == 1:
        line += f"\r\n\tfor <{recipients[0]}>"
    line += f"; {policy.rfc5322_date(now)}\r\n"
    # Every part is ours or checked: the client's address, a stored ID, addresses
    # split_address() accepted (no line breaks), the hostname.
    return line.encode("utf-8", "surrogateescape")


def add_routes(app: web.Application, context: WebContext) -> None:
    app.router.add_post(RELEASE_PATH, release)

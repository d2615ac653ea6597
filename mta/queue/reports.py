"""Which recipients a delivery status notification must report (RFC 3461 §4.1, RFC 3464).

Pure decisions, made by the queue manager after each attempt: a bounce for
failed recipients (unless NOTIFY excludes FAILURE), one delay warning per
message when ``delivery.retry.delay_warning`` is set, and an Action: relayed
report for NOTIFY=SUCCESS recipients handed to a next hop without DSN support.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mta.config import RetryConfig
from mta.model import LOCAL_RELAY, RcptState, Reply, notify_wants
from mta.store.api import DueRecipient

BOUNCE_LISTENER = "bounce"
DOUBLE_BOUNCE_LISTENER = "double-bounce"


@dataclass(frozen=True, slots=True)
class Report:
    """One recipient line of a DSN."""

    rcpt: DueRecipient
    action: str            # failed | delayed | relayed | delivered
    reply: Reply
    relay: str
    will_retry_until: float | None = None


@dataclass(frozen=True, slots=True)
class AttemptResult:
    rcpt: DueRecipient
    state: RcptState
    reply: Reply
    relay: str
    dsn_passed: bool = False


def reports_for(results: Sequence[AttemptResult], retry: RetryConfig, now: float) -> list[Report]:
    reports: list[Report] = []
    warn_delay = retry.delay_warning is not None
    for r in results:
        notify = r.rcpt.notify
        if r.state is RcptState.BOUNCED and notify_wants(notify, "FAILURE"):
            reports.append(Report(r.rcpt, "failed", r.reply, r.relay))
        elif r.state is RcptState.DELIVERED and notify_wants(notify, "SUCCESS") and not r.dsn_passed:
            # RFC 3461 §5.2.2: the next hop cannot report success, so we say "relayed";
            # mail kept in a mailbox here has reached its destination: "delivered".
            action = "delivered" if r.relay == LOCAL_RELAY else "relayed"
            reports.append(Report(r.rcpt, action, r.reply, r.relay))
        elif (r.state is RcptState.DEFERRED and warn_delay and not r.rcpt.delay_warned
              and now - r.rcpt.arrival >= (retry.delay_warning or 0) and notify_wants(notify, "DELAY")):
            reports.append(Report(r.rcpt, "delayed", r.reply, r.relay,
                                  will_retry_until=r.rcpt.arrival + retry.max_lifetime))
    return reports

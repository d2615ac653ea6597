"""The typed state of an inbound session: aiosmtpd's Session and Envelope plus
what this MTA keeps on them.

InboundSMTP creates both through aiosmtpd's ``_create_session`` and
``_create_envelope`` hooks, so the handler sees these types in every hook.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from aiosmtpd.smtp import Envelope, Session

from mta.inbound.policy import DSNParams

NO_DSN = DSNParams()   # a MAIL or RCPT without RFC 3461 parameters (immutable: shared)


class InboundSession(Session):
    """One client connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(loop)
        # The SASL mechanism of a successful AUTH, for the message's client= log line
        # (Postfix's sasl_method=).
        self.sasl_method: str | None = None


class InboundEnvelope(Envelope):
    """One mail transaction, with its RFC 3461 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.mail_dsn: DSNParams = NO_DSN        # RET and ENVID from MAIL
        self.rcpt_dsn: list[DSNParams] = []      # NOTIFY and ORCPT, one per entry of rcpt_tos

    def add_recipient(self, address: str, options: Iterable[str], dsn: DSNParams) -> None:
        """Accept one RCPT: its address, its other parameters and its DSN ones, kept aligned."""
        self.rcpt_tos.append(address)
        self.rcpt_options.extend(options)
        self.rcpt_dsn.append(dsn)

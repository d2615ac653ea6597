"""Fault injection on the SMTP listeners, as Mailpit's "Chaos" feature has it.

A test lab checks that the program it tests copes with a relay that refuses mail
now and then. Three triggers, each an SMTP reply code (400-599) and a probability
in percent (0-100):

* ``Sender``: the reply to MAIL FROM (default code 451),
* ``Recipient``: the reply to each RCPT TO (default 451),
* ``Authentication``: the reply to AUTH, once the mechanism is known and before
  the client's credentials are read (default 535).

A trigger that fires answers ``<code> <enhanced> Chaos <trigger> error``: Mailpit's
text (``451 Chaos recipient error``) behind the RFC 3463 code that our EHLO's
ENHANCEDSTATUSCODES promises on every reply (RFC 2034 §3). The triggers are set
over HTTP (``PUT /api/v1/chaos``, mta/web/chaos_api.py) only when the
configuration says ``chaos: true``; they live in the daemon's memory, like
Mailpit's, so a restart clears them.

This module holds the triggers and reads a request to change them; the SMTP
handler (mta/inbound/handler.py) asks :meth:`Chaos.fire` at each of the three
points, and counts and logs what fires.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mta.inbound.replies import default_enhanced
from mta.model import Reply

log = logging.getLogger("mta.chaos")

# The trigger names, in the order Mailpit's JSON has them, and their default codes.
DEFAULT_CODES: dict[str, int] = {"Sender": 451, "Recipient": 451, "Authentication": 535}
TRIGGERS: tuple[str, ...] = tuple(DEFAULT_CODES)


class ChaosError(ValueError):
    """A request to set triggers that cannot be taken; the text is one line for the client."""


@dataclass(frozen=True, slots=True)
class Trigger:
    error_code: int
    probability: int   # percent, 0 (never) to 100 (always)

    def to_json(self) -> dict[str, int]:
        return {"ErrorCode": self.error_code, "Probability": self.probability}


def default_triggers() -> dict[str, Trigger]:
    return {name: Trigger(code, 0) for name, code in DEFAULT_CODES.items()}


def _roll() -> int:
    """0-99, evenly: a trigger of probability p fires when the roll is below p."""
    return secrets.randbelow(100)


class Chaos:
    """The daemon's triggers: one object, shared by every SMTP listener and the HTTP API."""

    def __init__(self, enabled: bool = False, roll: Callable[[], int] = _roll):
        self._enabled = enabled
        self._roll = roll
        self.triggers: dict[str, Trigger] = default_triggers()

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        """``chaos`` changed by a reload: switched off, the triggers are dropped too, so
        switching it on again never brings back faults set long before."""
        if not value:
            self.triggers = default_triggers()
        self._enabled = value

    def fire(self, name: str) -> Reply | None:
        """The refusal of trigger ``name`` when it fires this time, else None."""
        trigger = self.triggers[name]
        if not self._enabled or trigger.probability <= 0 or self._roll() >= trigger.probability:
            return None
        code = trigger.error_code
        return Reply(code, default_enhanced(code), f"Chaos {name.lower()} error")

    def set(self, triggers: Mapping[str, Trigger], by: str = "") -> None:
        """Replace all three triggers (Mailpit: one left out goes back to its default, at 0%)."""
        self.triggers = {name: triggers.get(name, Trigger(DEFAULT_CODES[name], 0)) for name in TRIGGERS}
        log.info("triggers set%s: %s", f" by {by}" if by else "", ", ".join(
            f"{name} {t.error_code} at {t.probability}%" for name, t in self.triggers.items()))

    def to_json(self) -> dict[str, dict[str, int]]:
        """``{"Sender": {"ErrorCode": 451, "Probability": 0}, ...}``, as Mailpit answers."""
        return {name: trigger.to_json() for name, trigger in self.triggers.items()}


def parse_triggers(body: Any) -> dict[str, Trigger]:
    """The triggers a decoded ``PUT /api/v1/chaos`` body asks for; ChaosError says what is wrong.

    As Mailpit (a Go struct decoded from JSON): names match without regard to case,
    a trigger left out or null is the default at 0%, an ErrorCode left out or 0 is
    the trigger's default code. Unlike Mailpit, a name it would ignore is refused (a
    misspelt trigger would silently reset the real one), and nothing is changed
    unless the whole request is good.
    """
    if not isinstance(body, dict):
        raise ChaosError(f"expected a JSON object of triggers ({', '.join(TRIGGERS)}), got {_json_type(body)}")
    names = {name.lower(): name for name in TRIGGERS}
    triggers: dict[str, Trigger] = {}
    for key, value in body.items():
        name = names.get(key.lower())
        if name is None:
            raise ChaosError(f'unknown trigger "{key}" (want {", ".join(TRIGGERS)})')
        if name in triggers:
            raise ChaosError(f'trigger {name} is given twice')
        if value is not None:
            triggers[name] = _trigger(name, value)
    return triggers


def _trigger(name: str, value: Any) -> Trigger:
    if not isinstance(value, dict):
        raise ChaosError(f"{name}: expected an object with ErrorCode and Probability, got {_json_type(value)}")
    fields = {"errorcode": "ErrorCode", "probability": "Probability"}
    given: dict[str, Any] = {}
    for key, item in value.items():
        field = fields.get(key.lower())
        if field is None:
            raise ChaosError(f'{name}: unknown field "{key}" (want ErrorCode, Probability)')
        given[field] = item
    code = _integer(name, "ErrorCode", given.get("ErrorCode", 0)) or DEFAULT_CODES[name]
    probability = _integer(name, "Probability", given.get("Probability", 0))
    # Mailpit's own wording for these two.
    if not 400 <= code <= 599:
        raise ChaosError(f"{name}: error code must be between 400 and 599")
    if not 0 <= probability <= 100:
        raise ChaosError(f"{name}: probability must be between 0 and 100")
    return Trigger(code, probability)


def _integer(name: str, field: str, value: Any) -> int:
    # JSON has one number type: 451.0 is the number 451 (Go's decoder refuses it; no harm in taking it),
    # 451.5 and true are no integers.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ChaosError(f"{name}.{field}: expected an integer, got {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"

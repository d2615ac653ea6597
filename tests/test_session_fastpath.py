"""The fast reading of plain <local@domain> addresses agrees with aiosmtpd's full parser."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mta.inbound.session import InboundSMTP


class _Reader:
    local_part_limit = 64
    _getaddr = InboundSMTP._getaddr
    _getaddr_parsed = InboundSMTP._getaddr_parsed


READER = _Reader()
ATOM = st.text(alphabet="abcXYZ09!#$%&'*+/=?^_`{|}~-.", min_size=1, max_size=8)
LABEL = st.text(alphabet="abz09-", min_size=1, max_size=6)
TAIL = st.text(alphabet=" \t()SIZE=10BODY8x<>\"@", max_size=12)


@settings(max_examples=600, deadline=None)
@given(local=ATOM, labels=st.lists(LABEL, min_size=1, max_size=3), lead=st.sampled_from(["", " ", "\t"]),
       tail=TAIL)
def test_fast_path_matches_the_parser(local, labels, lead, tail):
    arg = f"{lead}<{local}@{'.'.join(labels)}>{tail}"
    assert READER._getaddr(arg) == READER._getaddr_parsed(arg)


def test_examples():
    assert READER._getaddr("<a@b.test> SIZE=10 BODY=8BITMIME") == ("a@b.test", "SIZE=10 BODY=8BITMIME")
    assert READER._getaddr("<" + "x" * 65 + "@b.test>") == (None, None)   # local part over 64 octets
    assert READER._getaddr("<a@b.test") == (None, None)

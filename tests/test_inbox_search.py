"""Mailpit's search language: mta/inbox/search.py's parser, and what parsed queries match in
each backend's store (every field on its own is in test_inbox_store.py)."""

from __future__ import annotations

import datetime

import pytest

from mta.inbox.model import SearchTerm
from mta.inbox.search import (
    SearchError,
    clean_text,
    needle,
    parse_date,
    parse_query,
    parse_size,
    with_timezone,
)
from tests.support.backends import QueueBackend
from tests.support.inbox import deliver, message


def test_free_words_and_phrases():
    assert parse_query('hello "two words"  World') == [
        SearchTerm(None, "hello"), SearchTerm(None, "two words"), SearchTerm(None, "World")]
    assert parse_query("") == []
    assert parse_query("   ") == []


def test_fields_with_plain_and_quoted_values():
    assert parse_query('to:bob@lab.test From:"Alice Example" subject:"a b  c" cc:x bcc:y reply-to:z'
                       ' message-id:<id@x> tag:Urgent addressed:q mailbox:Alice@Lab.Test') == [
        SearchTerm("to", "bob@lab.test"), SearchTerm("from", "Alice Example"), SearchTerm("subject", "a b  c"),
        SearchTerm("cc", "x"), SearchTerm("bcc", "y"), SearchTerm("reply-to", "z"),
        SearchTerm("message-id", "<id@x>"), SearchTerm("tag", "Urgent"), SearchTerm("addressed", "q"),
        SearchTerm("mailbox", "Alice@Lab.Test")]


def test_negation_with_dash_or_bang():
    assert parse_query('-is:read !subject:"x y" -word !"a phrase"') == [
        SearchTerm("is", "read", True), SearchTerm("subject", "x y", True), SearchTerm(None, "word", True),
        SearchTerm(None, "a phrase", True)]


def test_flags():
    assert parse_query("is:read IS:UNREAD is:tagged has:attachment has:attachments") == [
        SearchTerm("is", "read"), SearchTerm("is", "unread"), SearchTerm("is", "tagged"),
        SearchTerm("has", "attachment"), SearchTerm("has", "attachment")]
    # As Mailpit: any other is:/has: word is a free word.
    assert parse_query("is:urgent") == [SearchTerm(None, "is:urgent")]


def test_terms_without_letters_or_values_are_skipped_as_mailpit_does():
    assert parse_query('- ! "" subject: to:"" ;; été') == [SearchTerm(None, "été")]


def test_unknown_prefix_is_a_free_word():
    assert parse_query("foo:bar") == [SearchTerm(None, "foo:bar")]


def test_dates_are_checked_at_parse_time():
    assert parse_query("before:2024-01-31 after:\"2 Jan 2024\"") == [
        SearchTerm("before", "2024-01-31"), SearchTerm("after", "2 Jan 2024")]
    with pytest.raises(SearchError) as caught:
        parse_query("before:yesterday")
    assert str(caught.value) == ("before:yesterday: not a date (use YYYY-MM-DD, YYYY-MM-DD HH:MM, an RFC 5322 date"
                                 " or a POSIX time)")
    with pytest.raises(SearchError):
        parse_query("-after:2024-13-01")


def test_sizes_are_checked_at_parse_time():
    assert parse_query("larger:10k smaller:1.5mb") == [SearchTerm("larger", "10k"), SearchTerm("smaller", "1.5mb")]
    with pytest.raises(SearchError) as caught:
        parse_query("larger:big")
    assert "\n" not in str(caught.value) and str(caught.value).startswith("larger:big: not a size")
    with pytest.raises(SearchError):
        parse_query("smaller:2g")


def test_has_inline_is_refused_with_a_reason():
    with pytest.raises(SearchError, match="inline"):
        parse_query("has:inline")


def test_parse_size_as_mailpit():
    assert parse_size("500") == 500
    assert parse_size("10k") == 10 * 1024
    assert parse_size("10KB") == 10 * 1024
    assert parse_size("2M") == 2 * 1024 * 1024
    assert parse_size("1.5mb") == int(1.5 * 1024 * 1024)
    assert parse_size("0") == 0


def test_parse_date_forms():
    utc = datetime.UTC
    midnight = datetime.datetime(2024, 1, 31, tzinfo=utc).timestamp()
    assert parse_date("2024-01-31", utc) == midnight
    assert parse_date("2024/01/31", utc) == midnight
    assert parse_date("31 Jan 2024", utc) == midnight
    assert parse_date("January 31, 2024", utc) == midnight
    assert parse_date("2024-01-31 10:30", utc) == midnight + 10.5 * 3600
    assert parse_date("2024-01-31T10:30:00+02:00", utc) == midnight + 8.5 * 3600
    assert parse_date("Wed, 31 Jan 2024 10:30:00 +0000") == midnight + 10.5 * 3600
    assert parse_date("1706659200") == midnight
    assert parse_date("1706659200000") == midnight
    # Without a zone: local time (Mailpit's ParseLocal).
    assert parse_date("2024-01-31") == datetime.datetime(2024, 1, 31).astimezone().timestamp()


def test_with_timezone_makes_dates_absolute():
    tz = datetime.timezone(datetime.timedelta(hours=5))
    terms = with_timezone(parse_query("before:2024-01-31 subject:x"), tz)
    assert terms[1] == SearchTerm("subject", "x")
    assert float(terms[0].value) == datetime.datetime(2024, 1, 31, tzinfo=tz).timestamp()
    assert parse_query(f"before:{terms[0].value}") == [terms[0]]


def test_needles_are_lower_case_and_cleaned_as_mailpit_cleans():
    assert clean_text('Hello,  "World" <a@b>;(x)\r\n') == "hello world a@b x"
    assert needle(SearchTerm(None, "The Body <x;y>")) == "the body x y"
    assert needle(SearchTerm("to", "<Bob@Lab.Test>")) == "bob@lab.test"
    assert needle(SearchTerm("subject", "Re: (DRAFT)")) == "re: (draft)"


# --------------------------------------------------------------------------- on each backend's store
# What a parsed query matches in the store, on SQLite and on PostgreSQL alike (the fields
# one by one are in test_inbox_store.py): queries as a client types them, parsed here.


async def search(store: QueueBackend, query: str) -> list[str]:
    return [e.id for e in (await store.inbox.page(parse_query(query))).entries]


@pytest.mark.timeout(60)
async def test_queries_match_the_same_on_both_backends(store_backend: QueueBackend):
    store = store_backend
    await deliver(store, "QS0000000001", message("Re: Été report [draft]", to="Zoë <zoe@lab.test>",
                                                 body="Ünïcode body; 100% done_now\n"), ["zoe@lab.test"])
    await deliver(store, "QS0000000002", message("plain ascii", body="nothing special\n"), ["zoe@lab.test"])
    await store.inbox.set_tags(["QS0000000001"], ["Été", "CI"])
    one, two, both = ["QS0000000001"], ["QS0000000002"], ["QS0000000002", "QS0000000001"]
    cases = {
        'subject:"été report"': one, "subject:ÉTÉ": one, "subject:[draft]": one, "ünïcode": one, "ÜNÏCODE": one,
        # ';' is cleaned to a space on both sides, as Mailpit's cleanString does
        '"100% done_now"': one, "done%now": [], "done_": one, '"body 100%"': one, "to:zoë": one, "to:ZOË": one,
        "tag:ci": one, "tag:CI": one, "tag:Été": one, "tag:été": [],   # tags ignore ASCII case only (NOCASE)
        "-tag:ci": two, "is:tagged subject:report": one, "!is:tagged": two,
        "subject:plain -subject:report": two, "zoe@lab.test": one, "-zoe": two, "lab.test": both,
        "has:attachment": [],
    }
    assert {query: await search(store, query) for query in cases} == cases


@pytest.mark.timeout(60)
async def test_dates_in_a_time_zone_match_on_both_backends(store_backend: QueueBackend):
    store = store_backend
    midnight = datetime.datetime(2024, 1, 31, tzinfo=datetime.UTC).timestamp()
    await deliver(store, "QT0000000001", message("before"), ["zoe@lab.test"], arrival=midnight - 3600)
    await deliver(store, "QT0000000002", message("after"), ["zoe@lab.test"], arrival=midnight + 3600)
    plus2 = datetime.timezone(datetime.timedelta(hours=2))   # its midnight is 22:00 UTC the day before

    async def dated(query: str, tz: datetime.tzinfo) -> list[str]:
        return [e.id for e in (await store.inbox.page(with_timezone(parse_query(query), tz))).entries]

    assert await dated("before:2024-01-31", datetime.UTC) == ["QT0000000001"]
    assert await dated("after:2024-01-31", datetime.UTC) == ["QT0000000002"]
    assert await dated("before:2024-01-31", plus2) == []
    assert await dated("-before:2024-01-31", plus2) == ["QT0000000002", "QT0000000001"]

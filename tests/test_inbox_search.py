"""Mailpit's search language: mta/inbox/search.py's parser (the store's matching is in test_inbox_store.py)."""

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

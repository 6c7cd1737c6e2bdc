"""Validators and preconditions (RFC 9110 §8.8, §13): the pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serve_image.conditional import (
    Outcome,
    evaluate,
    http_date,
    if_range_matches,
    make_etag,
    parse_etags,
    parse_http_date,
)

ETAG = make_etag("0123456789abcdef0123456789abcdef", 1_700_000_000, 1234)
LM = 1_700_000_000
LM_DATE = "Tue, 14 Nov 2023 22:13:20 GMT"


def test_etag_is_strong_quoted_and_changes_with_version() -> None:
    assert ETAG == '"6553f100-4d2-01234567"'
    assert make_etag("0123456789abcdef", LM + 1, 1234) != ETAG
    assert make_etag("0123456789abcdef", LM, 1235) != ETAG


def test_http_date_round_trip() -> None:
    assert http_date(LM) == LM_DATE
    assert parse_http_date(LM_DATE) == LM


@pytest.mark.parametrize(
    "value",
    [
        "Sun, 06 Nov 1994 08:49:37 GMT",  # IMF-fixdate
        "Sunday, 06-Nov-94 08:49:37 GMT",  # obsolete RFC 850
        "Sun Nov  6 08:49:37 1994",  # asctime
    ],
)
def test_three_date_formats(value: str) -> None:
    assert parse_http_date(value) == 784111777


@pytest.mark.parametrize(
    "value",
    [
        "",
        "yesterday",
        "Sun, 06 Nov 1994 08:49:37 UTC",
        "Sun, 32 Nov 1994 08:49:37 GMT",
        "Sun, 06 Nov 1994 25:49:37 GMT",
        "Sun, 06 Foo 1994 08:49:37 GMT",
        "x" * 10_000,
        "Sun, 06 Nov 99999 08:49:37 GMT",
        "1700000000",
    ],
)
def test_invalid_dates_are_none(value: str) -> None:
    assert parse_http_date(value) is None


def test_parse_etags() -> None:
    assert parse_etags('"a", W/"b" ,"c"') == [(False, '"a"'), (True, '"b"'), (False, '"c"')]
    assert parse_etags("*") is None
    assert parse_etags('"a", garbage') == [(False, '"a"')]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (', "a"', [(False, '"a"')]),
        ('"a",,, W/"b" , ,', [(False, '"a"'), (True, '"b"')]),
        (' ,\t, "a"', [(False, '"a"')]),
        (",", []),
        ("", []),
        ('"a,b", "c"', [(False, '"a,b"'), (False, '"c"')]),  # a comma inside a tag is no separator
    ],
)
def test_parse_etags_ignores_empty_list_elements(
    value: str, expected: list[tuple[bool, str]]
) -> None:
    # Regression: an empty element used to end the parsing (RFC 9110 §5.6.1:
    # a recipient MUST accept empty elements and ignore them).
    assert parse_etags(value) == expected


def test_parse_etags_keeps_every_tag_of_a_long_list() -> None:
    # Regression: only the first 64 tags were kept, so a match further down was missed.
    tags = [f'"t{i}"' for i in range(5000)]
    assert parse_etags(", ".join(tags)) == [(False, t) for t in tags]


_OPAQUE = st.text(
    alphabet=st.sampled_from([chr(c) for c in (0x21, *range(0x23, 0x7F), 0x80, 0xFF)]),
    max_size=12,
).map(lambda t: f'"{t}"')
_SEPARATOR = st.sampled_from([",", ", ", " ,", " , ", ",,", ", ,", ",\t,", "\t,  ,  "])


@given(
    st.lists(st.tuples(st.booleans(), _OPAQUE), max_size=20),
    st.lists(_SEPARATOR, min_size=21, max_size=21),
    st.sampled_from(["", ",", ", ", " , ,"]),
    st.sampled_from(["", ",", " ,", ", ,"]),
)
def test_parse_etags_reads_back_any_list_with_empty_elements(
    tags: list[tuple[bool, str]], separators: list[str], lead: str, trail: str
) -> None:
    value = lead
    for i, (weak, opaque) in enumerate(tags):
        value += ("W/" if weak else "") + opaque + (separators[i] if i < len(tags) - 1 else "")
    assert parse_etags(value + trail) == tags


def run(method: str = "GET", **headers: str) -> Outcome:
    return evaluate(method, ETAG, LM, **headers)


def test_no_conditions_proceed() -> None:
    assert run() is Outcome.PROCEED


def test_if_none_match_equal_is_304() -> None:
    assert run(if_none_match=ETAG) is Outcome.NOT_MODIFIED


def test_if_none_match_other_is_200() -> None:
    # eZ 4.7 answered 304 to any If-None-Match once ETags were quoted.
    assert run(if_none_match='"other"') is Outcome.PROCEED


def test_if_none_match_is_weak_comparison() -> None:
    assert run(if_none_match=f"W/{ETAG}") is Outcome.NOT_MODIFIED


def test_if_none_match_list_and_star() -> None:
    assert run(if_none_match=f'"x", {ETAG}') is Outcome.NOT_MODIFIED
    assert run(if_none_match="*") is Outcome.NOT_MODIFIED


def test_empty_list_elements_do_not_hide_a_match() -> None:
    # The differential run against Apache httpd: `If-None-Match: , "<etag>"`
    # was a 200 and `If-Match: , "<etag>"` a 412.
    assert run(if_none_match=f", {ETAG}") is Outcome.NOT_MODIFIED
    assert run(if_match=f", {ETAG}") is Outcome.PROCEED
    assert run(if_none_match=f'"x", , {ETAG},') is Outcome.NOT_MODIFIED
    assert run(if_match=f'"x", , {ETAG},') is Outcome.PROCEED


@pytest.mark.parametrize("position", [64, 65, 999])
def test_a_match_far_down_a_long_list_counts(position: int) -> None:
    tags = [f'"other-{i}"' for i in range(1000)]
    tags[position] = ETAG
    assert run(if_none_match=", ".join(tags)) is Outcome.NOT_MODIFIED
    assert run(if_match=", ".join(tags)) is Outcome.PROCEED
    del tags[position]
    assert run(if_none_match=", ".join(tags)) is Outcome.PROCEED
    assert run(if_match=", ".join(tags)) is Outcome.PRECONDITION_FAILED


def test_if_none_match_on_other_methods_is_412() -> None:
    assert run("POST", if_none_match=ETAG) is Outcome.PRECONDITION_FAILED


def test_if_none_match_wins_over_if_modified_since() -> None:
    # §13.2.2 step 3 before 4: a non-matching tag means 200 whatever the date says.
    assert run(if_none_match='"other"', if_modified_since=http_date(LM + 10)) is Outcome.PROCEED


def test_if_modified_since() -> None:
    assert run(if_modified_since=LM_DATE) is Outcome.NOT_MODIFIED
    assert run(if_modified_since=http_date(LM + 3600)) is Outcome.NOT_MODIFIED
    assert run(if_modified_since=http_date(LM - 1)) is Outcome.PROCEED


def test_if_modified_since_only_for_get_and_head() -> None:
    assert evaluate("HEAD", ETAG, LM, if_modified_since=LM_DATE) is Outcome.NOT_MODIFIED
    assert evaluate("POST", ETAG, LM, if_modified_since=LM_DATE) is Outcome.PROCEED


def test_invalid_if_modified_since_is_ignored() -> None:
    assert run(if_modified_since="not a date") is Outcome.PROCEED


def test_if_match() -> None:
    assert run(if_match=ETAG) is Outcome.PROCEED
    assert run(if_match="*") is Outcome.PROCEED
    assert run(if_match='"other"') is Outcome.PRECONDITION_FAILED
    # Strong comparison: a weak tag never matches.
    assert run(if_match=f"W/{ETAG}") is Outcome.PRECONDITION_FAILED


def test_if_unmodified_since() -> None:
    assert run(if_unmodified_since=LM_DATE) is Outcome.PROCEED
    assert run(if_unmodified_since=http_date(LM - 1)) is Outcome.PRECONDITION_FAILED
    assert run(if_unmodified_since="garbage") is Outcome.PROCEED


def test_if_match_wins_over_if_unmodified_since() -> None:
    assert run(if_match=ETAG, if_unmodified_since=http_date(LM - 1)) is Outcome.PROCEED


def test_failed_if_match_beats_if_none_match() -> None:
    assert run(if_match='"x"', if_none_match=ETAG) is Outcome.PRECONDITION_FAILED


def test_validators_off() -> None:
    assert evaluate("GET", None, None, if_none_match=ETAG) is Outcome.PROCEED
    assert evaluate("GET", None, None, if_modified_since=LM_DATE) is Outcome.PROCEED
    assert evaluate("GET", None, None, if_match=ETAG) is Outcome.PRECONDITION_FAILED
    assert evaluate("GET", None, None, if_match="*") is Outcome.PROCEED


def test_if_range() -> None:
    assert if_range_matches(ETAG, ETAG, LM)
    assert not if_range_matches('"other"', ETAG, LM)
    assert not if_range_matches(f"W/{ETAG}", ETAG, LM)  # weak tags never match
    assert if_range_matches(LM_DATE, ETAG, LM)
    assert not if_range_matches(http_date(LM + 1), ETAG, LM)  # exact match only
    assert not if_range_matches("garbage", ETAG, LM)
    assert not if_range_matches(ETAG, None, None)


@given(
    st.text(max_size=200),
    st.text(max_size=200),
    st.text(max_size=200),
    st.text(max_size=200),
    st.sampled_from(["GET", "HEAD", "POST"]),
)
def test_no_header_value_raises(a: str, b: str, c: str, d: str, method: str) -> None:
    result = evaluate(
        method, ETAG, LM, if_match=a, if_none_match=b, if_modified_since=c, if_unmodified_since=d
    )
    assert isinstance(result, Outcome)
    assert isinstance(if_range_matches(a, ETAG, LM), bool)

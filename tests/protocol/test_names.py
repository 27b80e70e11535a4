"""Names that become files, and event filters."""

from __future__ import annotations

import fnmatch
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import EventFilter, check_durable, check_event, check_pattern, check_queue


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", ".hidden", "a/b", "../x", "a\x00b", "x" * 129, "é", "a b", "con/", 7, None, b"DB"],
)
def test_queue_names_that_could_escape_or_confuse_the_data_dir_are_refused(name: object) -> None:
    assert check_queue(name) is not None
    assert check_durable(name) is not None


@pytest.mark.parametrize("name", ["DB", "orders.eu-west.dead", "a", "x" * 128, "_", "0", "a..b"])
def test_good_queue_names(name: str) -> None:
    assert check_queue(name) is None


def test_event_names_allow_colon_and_slash_but_not_wildcards() -> None:
    assert check_event("user:created/v2") is None
    assert check_event("user.*") is not None
    assert check_pattern("user.*") is None
    assert check_pattern("*") is None


def test_error_message_names_the_rule_and_truncates_long_input() -> None:
    message = check_queue("../" + "x" * 500)
    assert message is not None and "1-128 characters" in message and len(message) < 200


ALPHABET = st.text("ab.", max_size=12)
PATTERN = st.text("ab.*", min_size=1, max_size=8)


@given(st.lists(PATTERN, min_size=1, max_size=3), ALPHABET)
def test_filter_agrees_with_fnmatch(patterns: list[str], event: str) -> None:
    expected = any(fnmatch.fnmatchcase(event, p) for p in patterns)
    assert EventFilter(patterns)(event) is expected


def test_filter_examples() -> None:
    f = EventFilter(["CREATE", "user.*"])
    assert f("CREATE") and f("user.created") and f("user.a.b")
    assert not f("DELETE") and not f("user") and not f("CREATED")
    assert EventFilter([])("anything") and EventFilter(["*"])("anything")


def test_pathological_patterns_match_in_linear_time() -> None:
    """A backtracking matcher takes seconds at 30 characters and years at 128."""
    f = EventFilter(["*a" * 40 + "*b"])
    started = time.perf_counter()
    assert not f("a" * 128)
    assert time.perf_counter() - started < 0.5

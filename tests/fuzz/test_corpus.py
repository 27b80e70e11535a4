"""Replay the fuzz targets' seeds and every saved input (RELIABILITY.md F5).

``make fuzz`` (atheris) adds to ``tests/fuzz/corpus/TARGET`` the inputs
that reached new code, and any input that crashed a target; here each is
run through its target again on every ``make test``, so a bug fuzzing found
stays found.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol import Limits
from tests.fuzz.seeds import SEEDS
from tests.fuzz.targets import LIMITS, TARGETS

CORPUS = Path(__file__).resolve().parent / "corpus"
SAVED = sorted((t, p) for t in TARGETS for p in (CORPUS / t).glob("*") if p.is_file())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeds(target: str) -> None:
    seeds = SEEDS[target]()
    assert seeds
    for data in seeds:
        TARGETS[target](data)


@pytest.mark.parametrize(("target", "path"), SAVED, ids=[f"{t}/{p.name}" for t, p in SAVED])
def test_saved_input(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


def test_the_targets_fail_on_what_they_must_catch() -> None:
    """The oracles are not empty: a handler bug (the injected ``status:bug``)
    fails the session target, and so does a reply cut off mid-frame."""
    from broker import faults
    from protocol import Status, encode_frame
    from tests.fuzz.targets import _frames

    stream = bytes([63]) + encode_frame(Status(2).to_wire())
    TARGETS["session"](stream)
    faults.configure("status:bug")
    try:
        with pytest.raises(AssertionError, match="internal error"):
            TARGETS["session"](stream)
    finally:
        faults.configure(None)
    with pytest.raises(AssertionError, match="not a whole frame"):
        _frames(b"\x00\x00\x00\x05\x93")
    assert LIMITS.max_frame_size < Limits().max_frame_size  # (small limits: "too large" is reachable)

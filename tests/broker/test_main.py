"""``tidings-broker``'s command line (broker/__main__.py)."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from broker.__main__ import build_parser, config_from_args
from broker.config import MIN_MAX_FRAME_BYTES
from client import Client
from tests.helpers import BrokerProcess, running_broker, url_of


@pytest.mark.parametrize("value", ["100", "0", "-1", str(MIN_MAX_FRAME_BYTES - 1)])
def test_a_frame_limit_below_the_minimum_is_a_usage_error(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--max-frame-bytes 100 used to start a broker that refused every publish
    ('exceeds the limit of -156') and could not answer STATUS."""
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--max-frame-bytes", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"--max-frame-bytes: {value} is below the minimum of {MIN_MAX_FRAME_BYTES}" in err, err


@pytest.mark.parametrize(
    ("flag", "value", "why"),
    [
        ("--segment-bytes", "2048", "must be at least 4096"),
        ("--heartbeat", "-1", "must be at least 0"),
        ("--retention-bytes", "-1", "must be at least 0"),
        ("--retention-age", "-5", "must be at least 0"),
        ("--retention-check", "0", "must be above 0"),
        ("--auth-failure-delay", "-1", "must be at least 0"),
        ("--fsync-interval", "0", "must be above 0"),
    ],
)
def test_a_value_out_of_range_is_a_usage_error(
    flag: str, value: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every flag's range is checked where its value is read: exit 2 (usage),
    naming the flag, as --help says. (Some were exit 1, a start-up error,
    after the whole command line was taken; found by an operator walkthrough.)"""
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {why}: '{value}'" in err, err


def test_the_daemon_refuses_it_before_touching_the_data_directory(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "broker", "--max-frame-bytes", "100", "--data-dir", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2 and f"below the minimum of {MIN_MAX_FRAME_BYTES}" in result.stderr, result
    assert "Traceback" not in result.stderr and not (tmp_path / "d").exists()


async def test_at_the_minimum_status_pages_and_a_message_work(tmp_path: Path) -> None:
    """The minimum is enough for what it is there for: STATUS, in pages, with
    the longest names, and a message of a few KB from a producer."""
    args = build_parser().parse_args(["--max-frame-bytes", str(MIN_MAX_FRAME_BYTES)])
    limits = config_from_args(args).limits
    async with running_broker(tmp_path, limits=limits) as broker:
        clients = [await Client.open(url_of(broker), name=f"{i:02}" + "n" * 254) for i in range(20)]
        try:
            c = clients[0]
            queue = "q" * 128
            assert await c.publish(queue, "e" * 128, b"x" * 3000) == 0
            for i, other in enumerate(clients):
                await other.subscribe(queue, durable=f"{i:02}" + "d" * 126, events=["e" * 128])
            info = await c.status()  # paged: 20 connections of ~500 bytes
            assert len(info["connections"]) == 20 and len(info["durables"]) == 20
            assert info["queues"][0]["next_offset"] == 1
        finally:
            for other in clients:
                await other.aclose()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"tidings-broker {importlib.metadata.version('tidings')}\n"


@pytest.mark.parametrize("level", ["warning", "error"])
def test_the_listening_address_is_logged_at_every_log_level(tmp_path: Path, level: str) -> None:
    """With --port 0 the log is the only place that says the port: its line
    is written at every --log-level, and nothing else below the level is. (At
    --log-level warning the log stayed empty; found by a new-user walkthrough.)"""
    bp = BrokerProcess(tmp_path, "--log-level", level).start(timeout=20)
    try:
        assert bp.status() is not None  # the port logged is the one it serves on
        assert bp.stop() == 0
    finally:
        bp.kill()
    assert [line.split(" ", 2)[2].rstrip() for line in bp.log] == [
        f"INFO    broker.server: listening on 127.0.0.1:{bp.port}"
    ], bp.log


def test_the_first_line_says_the_version_and_what_a_confirm_means(tmp_path: Path) -> None:
    """An operator reading the log learns at once what runs and with which
    durability and retention (the log said only the data directory and the
    port; found by a new-user walkthrough)."""
    bp = BrokerProcess(tmp_path, "--fsync", "interval", "--fsync-interval", "0.5", "--retention-age", "3600",
                       "--keep-unacked", "--segment-bytes", "1048576").start(timeout=20)  # fmt: skip
    try:
        assert bp.stop() == 0
    finally:
        bp.kill()
    first = bp.log[0].split(" ", 2)[2].rstrip()
    loop = f"uvloop {importlib.metadata.version('uvloop')}"
    assert first == (
        f"INFO    broker: tidings-broker {importlib.metadata.version('tidings')} (CPython {platform.python_version()}, "
        f"{loop}): fsync every 0.5 s (a publish is confirmed before it); segments of 1 MiB; retention: at most "
        "3600 s; unacked kept"
    ), bp.log


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--port", "70000"], "argument --port: must be in 0..65535 (0 = any free port): '70000'"),
        (["--port", "-1"], "argument --port: must be in 0..65535 (0 = any free port): '-1'"),
        (["--tls-cert", "cert.pem"], "a TLS certificate needs its key, and a key its certificate"),
    ],
)
def test_a_wrong_command_line_is_a_usage_error(tmp_path: Path, args: list[str], why: str) -> None:
    """Exit 2 with the usage line, as --help's exit codes say, for every
    error of the command line itself, those found once it is parsed (options
    that do not go together) included: --port 70000 and --tls-cert without
    --tls-key exited 1 (could not start), --heartbeat -1 exited 2."""
    result = subprocess.run(
        [sys.executable, "-m", "broker", "--data-dir", str(tmp_path / "d"), *args],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert result.stderr.startswith("usage: tidings-broker ") and f"tidings-broker: error: {why}" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "d").exists()

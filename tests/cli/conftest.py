"""Fixtures for the ``tidings`` CLI tests: the real executable against a real broker subprocess."""

from __future__ import annotations

import itertools
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.helpers import BrokerProcess, broker_process

ROOT = Path(__file__).resolve().parents[2]
_script = shutil.which("tidings", path=os.path.dirname(sys.executable))
#: How to run the CLI: the installed console script when there is one.
TIDINGS: list[str] = [_script] if _script else [sys.executable, "-m", "client.cat"]
TIMEOUT = 20.0
_names = itertools.count(1)


def cli_env(**extra: str) -> dict[str, str]:
    """The environment for a CLI run: no TIDINGS_* leaking in from the caller."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIDINGS_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run(
    *args: str | int | float,
    url: str | None = None,
    input: str | bytes | None = None,
    timeout: float = TIMEOUT,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``tidings ARGS`` to completion; stdin is empty unless ``input`` is given.

    Asserts what must hold for every run: one-line errors, never a traceback.
    """
    cmd = [*TIDINGS, *map(str, args)]
    if url is not None:
        cmd += ["--url", url]
    data = input.encode() if isinstance(input, str) else input
    proc = subprocess.run(
        cmd, input=data, stdin=None if data is not None else subprocess.DEVNULL,
        capture_output=True, timeout=timeout, env=env or cli_env(), cwd=ROOT,
    )  # fmt: skip
    out = proc.stdout.decode("utf-8", "replace")
    err = proc.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    if proc.returncode != 0:
        assert len(err.strip().splitlines()) <= 1 or err.lstrip().startswith("usage:"), err
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_all(
    commands: Sequence[Sequence[str | int | float]], input: str | None = None
) -> list[subprocess.CompletedProcess[str]]:
    """Run several ``tidings`` commands at once (they are independent); results in order."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(pool.map(lambda args: run(*args, input=input), commands))


def start(*args: str | int, url: str | None = None, stdin: int | None = subprocess.DEVNULL) -> subprocess.Popen[bytes]:
    """Start ``tidings ARGS`` in the background with stdout and stderr piped."""
    cmd = [*TIDINGS, *map(str, args)]
    if url is not None:
        cmd += ["--url", url]
    return subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), cwd=ROOT)


class Lines:
    """Read lines from a pipe with a timeout (no threads, no sleeps)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        # poll, not select: select() refuses descriptors above 1023, which a
        # process that ran the 10,000-connection tests before may hand out.
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def readline(self, timeout: float = TIMEOUT) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line within {timeout}s (have {self.buf!r})")
            if self._poll.poll(remaining * 1000):  # (readable, or the writer gone: the read says which)
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    raise EOFError(f"pipe closed (have {self.buf!r})")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def readlines(self, n: int, timeout: float = TIMEOUT) -> list[bytes]:
        return [self.readline(timeout) for _ in range(n)]


def finish(proc: subprocess.Popen[bytes], timeout: float = TIMEOUT) -> tuple[int, str]:
    """Wait for a background run; return its exit status and stderr."""
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    text = err.decode("utf-8", "replace")
    assert "Traceback" not in text, text
    return proc.returncode, text


def free_port() -> int:
    """A port nothing listens on: bound, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture(scope="package")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """One broker for the whole CLI suite; tests use their own queue names."""
    with broker_process(tmp_path_factory.mktemp("cli-broker")) as bp:
        yield bp


@pytest.fixture
def url(broker: BrokerProcess) -> str:
    return broker.url


@pytest.fixture
def queue(request: pytest.FixtureRequest) -> str:
    """A queue name of this test's own."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:80].strip("-")
    return f"{base}-{next(_names)}"


def lines_of(text: str) -> Sequence[str]:
    return [line for line in text.splitlines() if line]

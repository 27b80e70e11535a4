"""``parse_url``: tidings://host:port and nothing more."""

from __future__ import annotations

import asyncio
import os
import ssl
import sys
from pathlib import Path

import pytest

from client import Client, ConfigError
from client._transport import parse_url
from tests.helpers import running_broker, url_of


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("tidings://127.0.0.1:6464", ("127.0.0.1", 6464, False)),
        ("tidingss://broker.example:7000/", ("broker.example", 7000, True)),
        ("tidings://[::1]:7", ("::1", 7, False)),
        ("tidings://host", ("host", 6464, False)),
    ],
)
def test_a_plain_url_is_host_port_and_tls(url: str, expected: tuple[str, int, bool]) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("tidings://s3cret@host:6464/path", "has a user or token before '@'"),
        ("tidings://user:s3cret@host", "has a user or token before '@'"),
        ("http://s3cret@host", "unsupported URL"),
        ("tidings://host:6464/queue", "has more than tidings://host:port"),
        ("tidings://host:6464?token=x", "has more than tidings://host:port"),
        ("tidings://host:6464#x", "has more than tidings://host:port"),
        ("tidings:host:6464", "has more than tidings://host:port"),  # no //: the host was taken for a path
        ("tidings://host:port", "bad port"),
    ],
)
def test_anything_more_is_refused_not_ignored(url: str, why: str) -> None:
    """A token in the URL used to be dropped without a word (the client then
    connected without it); a path or query, likewise."""
    with pytest.raises(ConfigError, match=why) as info:
        parse_url(url)
    assert "s3cret" not in str(info.value)  # a token is never printed back
    with pytest.raises(ConfigError):
        Client(url)


def test_a_tls_context_with_a_plain_url_is_refused_not_ignored() -> None:
    """ssl_context with tidings:// was dropped without a word: the client
    connected in plain TCP. The URL was most likely meant to be tidingss://."""
    with pytest.raises(ConfigError, match=r"plain TCP: use tidingss://127\.0\.0\.1:6464"):
        Client("tidings://127.0.0.1:6464", ssl_context=ssl.create_default_context())
    assert Client("tidingss://127.0.0.1:6464", ssl_context=ssl.create_default_context()).port == 6464


async def test_the_library_prints_nothing_of_its_own(tmp_path: Path) -> None:
    """An application that configured no logging and gets AuthFailed raised saw
    the same error printed on stderr too, once per attempt (Python's last-resort
    handler took the library's WARNING): a library logs, the application decides."""
    script = (
        "import asyncio, sys\n"
        "from client import Client, AuthFailed\n"
        "async def main():\n"
        "    try:\n"
        "        async with Client(sys.argv[1], token='wrong', reconnect=False):\n"
        "            pass\n"
        "    except AuthFailed:\n"
        "        print('refused')\n"
        "asyncio.run(main())\n"
    )
    async with running_broker(tmp_path, token="right") as broker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, url_of(broker),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert (out, err, proc.returncode) == (b"refused\n", b"", 0)

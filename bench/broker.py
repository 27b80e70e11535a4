"""The broker under test as a subprocess, what /proc says about it, and throwaway TLS files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), in seconds; None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may contain spaces: split after its closing parenthesis.
    fields = data[data.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_cpu_seconds() -> tuple[float, float] | None:
    """CPU seconds all cores spent busy since boot, and those the hypervisor
    took from this VM (steal), from /proc/stat: to spot other load."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    # cpu user nice system idle iowait irq softirq steal ...
    ticks = [int(x) for x in fields[1:9]] + [0] * (9 - len(fields))
    busy = ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]
    return busy / _CLK_TCK, ticks[7] / _CLK_TCK


def proc_status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmHWM, VmRSS...), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files made by :func:`make_tls_files` (all certificates for 127.0.0.1 and localhost)."""

    ca: Path  #: the test CA's certificate
    cert: Path  #: the server's, signed by the CA
    key: Path
    client_cert: Path  #: a client's, signed by the CA
    client_key: Path
    expired: Path  #: the server key's certificate, signed by the CA, expired yesterday
    self_signed: Path  #: the server key's certificate, signed by itself


def make_tls_files(folder: Path) -> TlsFiles:
    """A throwaway CA and certificates, made with the ``openssl`` command."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=30)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    (folder / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=tidings test CA")
    for name in ("server", "client"):
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=tidings test {name}")
    sign = ["x509", "-req", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial"]
    openssl(*sign, "-in", "server.csr", "-out", "server.pem", "-days", "2", "-extfile", "san.ext")
    openssl(*sign, "-in", "server.csr", "-out", "expired.pem", "-days", "-1", "-extfile", "san.ext")
    openssl(*sign, "-in", "client.csr", "-out", "client.pem", "-days", "2", "-extfile", "client.ext")
    openssl("x509", "-req", "-in", "server.csr", "-signkey", "server.key", "-out", "self.pem", "-days", "2",
            "-extfile", "san.ext")  # fmt: skip
    return TlsFiles(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem",
                    folder / "client.key", folder / "expired.pem", folder / "self.pem")  # fmt: skip


class BrokerProcess:
    """``python -m broker --port 0`` as a real subprocess (so SIGKILL is real).

    ``start()`` returns once the broker has logged ``listening on HOST:PORT``
    (the port is read from that line: the broker binds port 0 itself); its
    log lines are kept in ``log``. The benchmarks and the tests both use it.

    Args:
        data_dir: the data folder.
        args: more command-line arguments (``--fsync interval``...).
        env: more environment variables (``TIDINGS_FAULT``...).
        prefix: wrap the command (e.g. ``[python, -m, cProfile, -o, file]``).
    """

    #: The oldest log lines are dropped past this many (a long benchmark).
    MAX_LOG_LINES = 10_000

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None,
                 prefix: list[str] | None = None) -> None:  # fmt: skip
        self.data_dir = data_dir
        self.args = args
        self.env = env or {}
        self.prefix = prefix
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0
        self.log: list[str] = []
        self._drain: threading.Thread | None = None
        self._listening = threading.Event()

    @property
    def url(self) -> str:
        return f"tidings{'s' if '--tls-cert' in self.args else ''}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> BrokerProcess:
        """Start it; return once it listens.

        Raises:
            RuntimeError: it did not log ``listening on`` within ``timeout`` seconds
                (the broker logs that line at every ``--log-level``).
        """
        head = self.prefix or [sys.executable]
        cmd = [*head, "-m", "broker", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(self.data_dir),
               *self.args]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
        )  # fmt: skip
        # A thread reads the log from the start (so the broker never blocks on
        # a full pipe) and spots the line; start() waits for it with a timeout.
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()
        if not self._listening.wait(timeout) or not self.port:
            self.kill()
            raise RuntimeError(f"broker did not start within {timeout} s:\n" + "".join(self.log[-30:]))
        return self

    def _read_log(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if not self.port and (m := re.search(r"listening on [^ ]+:(\d+)", line)):
                self.port = int(m.group(1))
                self._listening.set()
            if len(self.log) > self.MAX_LOG_LINES:
                del self.log[: self.MAX_LOG_LINES // 2]
        self._listening.set()  # it exited: start() need not wait any longer

    def cpu_seconds(self) -> float | None:
        return proc_cpu_seconds(self.pid)

    def peak_rss_kb(self) -> int | None:
        return proc_status_kb(self.pid, "VmHWM")

    def fsyncs(self) -> int | None:
        """The broker's own count of log fsyncs (STATUS server.fsyncs), or None."""
        status = self.status()
        value = (status or {}).get("server", {}).get("fsyncs")
        return value if isinstance(value, int) else None

    def status(self) -> dict[str, Any] | None:
        """The broker's STATUS reply (None if it cannot be had)."""
        return asyncio.run(_status(self.url))

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (graceful), wait (SIGKILL if it hangs), reap; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self._reap(timeout)

    def kill(self) -> int:
        """SIGKILL, then reap; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self._reap()

    def wait(self, timeout: float) -> int:
        """Wait for the broker to exit by itself; its whole log is then in ``log``.

        Raises:
            subprocess.TimeoutExpired: it is still running after ``timeout`` seconds.
        """
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._drain is not None:
            self._drain.join(5)  # the lines it wrote last may still be in the pipe
        return code

    def _reap(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._drain is not None:
            self._drain.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode


@contextlib.contextmanager
def broker_process(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[BrokerProcess]:
    """A broker subprocess, always killed at the end (use ``stop()`` inside for a graceful exit)."""
    bp = BrokerProcess(data_dir, *args, env=env).start()
    try:
        yield bp
    finally:
        bp.kill()


async def _status(url: str) -> dict[str, Any] | None:
    from client import Client

    try:
        async with Client(url, name="bench-status", timeout=10.0) as c:
            return await c.status()
    except Exception:
        return None

"""A peer's server as a subprocess on loopback, with its data in a temporary folder."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ..broker import proc_cpu_seconds, proc_status_kb
from ..scenarios import Options, Target


def free_port() -> int:
    """A port the OS just handed out on 127.0.0.1 (for servers that cannot bind port 0 themselves)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PeerProcess:
    """A server subprocess; ready once a line of its log matches ``ready``."""

    def __init__(self, cmd: list[str], ready: str, url: str, env: dict[str, str] | None = None,
                 cwd: Path | None = None, port_from_log: bool = False) -> None:  # fmt: skip
        self.cmd = cmd
        self.ready = re.compile(ready)
        self.url = url
        self.env = env
        self.cwd = cwd
        self.port_from_log = port_from_log
        self.log: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self._drain: threading.Thread | None = None
        self.server_pid: int | None = None  # when the process we start execs or forks the real server

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.server_pid or self.proc.pid

    def start(self, timeout: float = 60.0) -> PeerProcess:
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(self.env or {})}, cwd=self.cwd, start_new_session=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        found = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.log.append(line)
                if len(self.log) > 5000:
                    del self.log[:2500]
                if not found.is_set():
                    m = self.ready.search(line)
                    if m:
                        if self.port_from_log:
                            self.url = self.url.replace("{port}", m.group("port"))
                        found.set()

        self._drain = threading.Thread(target=read, daemon=True)
        self._drain.start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.cmd[0]} did not start:\n" + "".join(self.log[-30:]))
        return self

    def cpu_seconds(self) -> float | None:
        return proc_cpu_seconds(self.pid)

    def peak_rss_kb(self) -> int | None:
        return proc_status_kb(self.pid, "VmHWM")

    def fsyncs(self) -> int | None:
        return None  # no counter exposed by the peers' servers

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the process group we started (its own session), then SIGKILL if it lingers."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers in the group we created
        if self._drain is not None:
            self._drain.join(5)


class PeerTargetBase(Target):
    """A peer broker: subclasses build the command line in :meth:`process`."""

    def __init__(self, opts: Options, kind: str, binary: str | None) -> None:
        super().__init__(opts)
        self.kind = kind
        self.binary = binary or kind
        # Not the tidings --fsync setting inherited from Target: each peer sets its own.
        self.fsync_before_confirm = False

    def process(self, data_dir: Path) -> PeerProcess:
        raise NotImplementedError

    @contextlib.contextmanager
    def server(self, tag: str) -> Iterator[PeerProcess]:
        with tempfile.TemporaryDirectory(prefix=f"bench-{self.kind}-") as tmp:
            proc = self.process(Path(tmp)).start()
            try:
                yield proc
            finally:
                proc.stop()

    def durable_lag(self, server: object, name: str) -> int | None:
        return None

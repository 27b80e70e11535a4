"""Orchestration: start worker processes (spawn), release them together, collect."""

from __future__ import annotations

import multiprocessing as mp
import queue as queue_mod
import sys
import time
from typing import Any

from . import workers

_ctx = mp.get_context("spawn")


class WorkerError(RuntimeError):
    pass


class Progress:
    """One status line on stderr, rewritten in place when stderr is a terminal."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.prefix = ""
        self.label = ""
        self._last = 0.0
        self._t0 = time.monotonic()

    def start(self, label: str) -> None:
        self.label = label
        self._t0 = time.monotonic()
        self.show("starting", force=True)

    def show(self, text: str, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < (0.5 if self.tty else 5.0):
            return
        self._last = now
        line = f"{self.prefix} {self.label}: {text} [{now - self._t0:5.1f}s]"
        if self.tty:
            sys.stderr.write("\r\x1b[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self, text: str) -> None:
        if not self.enabled:
            return
        line = f"{self.prefix} {self.label}: {text}"
        sys.stderr.write(("\r\x1b[K" if self.tty else "") + line + "\n")
        sys.stderr.flush()


class Group:
    """A set of worker processes that start together.

    ``start`` spawns them and waits until each reported ready; ``go`` releases
    them; ``wait`` collects their results.
    """

    def __init__(self, progress: Progress | None = None, timeout: float = 600.0) -> None:
        self.out = _ctx.Queue()
        self.go_event = _ctx.Event()
        self.procs: dict[int, Any] = {}
        self.params: dict[int, dict[str, Any]] = {}
        self.results: dict[int, dict[str, Any]] = {}
        self.progress = progress
        self.timeout = timeout
        self._next = 0
        self._ready: set[int] = set()

    def add(self, params: dict[str, Any]) -> int:
        wid = self._next
        self._next += 1
        proc = _ctx.Process(target=workers.main, args=(wid, params, self.out, self.go_event), daemon=True)
        proc.start()
        self.procs[wid] = proc
        self.params[wid] = params
        return wid

    def _pump(self, until: Any, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not until():
            if time.monotonic() > deadline:
                raise WorkerError(f"timed out waiting for workers ({what})")
            try:
                kind, wid, data = self.out.get(timeout=0.2)
            except queue_mod.Empty:
                self._check_alive()
                if self.progress is not None:
                    self.progress.show(what)
                continue
            if kind == "ready":
                self._ready.add(wid)
            elif kind == "result":
                self.results[wid] = data
            else:
                raise WorkerError(f"worker {wid} ({self.params[wid]['role']}) failed:\n{data}")
            if self.progress is not None:
                self.progress.show(what)

    def _check_alive(self) -> None:
        for wid, proc in self.procs.items():
            if not proc.is_alive() and wid not in self.results and proc.exitcode not in (None, 0):
                raise WorkerError(f"worker {wid} ({self.params[wid]['role']}) died: exit {proc.exitcode}")

    def wait_ready(self) -> None:
        self._pump(lambda: len(self._ready) == len(self.procs), "setting up")

    def go(self) -> None:
        self.go_event.set()

    def wait(self, what: str = "running") -> dict[int, dict[str, Any]]:
        self._pump(lambda: len(self.results) == len(self.procs), what)
        for proc in self.procs.values():
            proc.join(10)
        return self.results

    def close(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self.out.close()
        self.out.join_thread()


def run_group(specs: list[dict[str, Any]], progress: Progress | None = None, what: str = "running",
              timeout: float = 600.0) -> list[dict[str, Any]]:  # fmt: skip
    """Start every worker, release them together, return their results in order."""
    g = Group(progress, timeout)
    try:
        ids = [g.add(s) for s in specs]
        g.wait_ready()
        g.go()
        results = g.wait(what)
        return [results[i] for i in ids]
    finally:
        g.close()

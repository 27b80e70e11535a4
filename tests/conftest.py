"""Test hooks: run ``async def`` tests on asyncio and uvloop, fail on stray task errors.

Every coroutine test runs in a fresh ``asyncio.Runner(debug=True)`` under a
timeout, once per loop factory; a loop exception handler collects errors such
as "Task exception was never retrieved" and fails the test (asyncpg's
``_testbase`` idea). No pytest-asyncio needed.
"""

from __future__ import annotations

import asyncio
import inspect
import os
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from tests.helpers import TlsFiles, make_tls_files

settings.register_profile("dev", max_examples=100, deadline=None)
settings.register_profile("ci", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

TEST_TIMEOUT = float(os.environ.get("TIDINGS_TEST_TIMEOUT", "60"))

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
}
try:
    import uvloop

    LOOP_FACTORIES["uvloop"] = uvloop.new_event_loop
except ImportError:  # pragma: no cover - uvloop is optional
    pass


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if inspect.iscoroutinefunction(metafunc.function):
        metafunc.fixturenames.append("aio_loop")
        one = metafunc.definition.get_closest_marker("one_loop") is not None
        metafunc.parametrize("aio_loop", [max(LOOP_FACTORIES)] if one else sorted(LOOP_FACTORIES))


async def _guarded(coro: Coroutine[Any, Any, None], errors: list[str]) -> None:
    loop = asyncio.get_running_loop()

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        errors.append(f"{context.get('message')}: {context.get('exception')!r}")

    loop.set_exception_handler(handler)
    loop.slow_callback_duration = 1.0  # debug mode's 0.1 s warns on every fsync-heavy test
    async with asyncio.timeout(TEST_TIMEOUT):
        await coro


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    fn = pyfuncitem.obj
    if not inspect.iscoroutinefunction(fn):
        return None
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in pyfuncitem.funcargs.items() if k in params}
    factory = LOOP_FACTORIES[pyfuncitem.callspec.params["aio_loop"]]
    errors: list[str] = []
    with asyncio.Runner(debug=True, loop_factory=factory) as runner:
        runner.run(_guarded(fn(**kwargs), errors))
    if errors:
        pytest.fail("unhandled errors in the event loop:\n" + "\n".join(errors))
    return True


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway CA, server and client certificates (made once per run)."""
    return make_tls_files(tmp_path_factory.mktemp("tls"))

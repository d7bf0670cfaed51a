from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from .procs import DqidProcess

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """The path of an external tool; skip without it, but fail in CI."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        message = f"{name} is not installed"
        if IN_CI:
            pytest.fail(f"{message}; .ci/run must install it")
        pytest.skip(message)
    return path


class ProcessPool:
    """Starts dqid processes for one test and kills every one at its end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[DqidProcess] = []
        self.others: list = []

    def node(self, node_id: str, *args: str, **kw) -> DqidProcess:
        process = DqidProcess(self.workdir, node_id, list(args), **kw)
        self.started.append(process)
        return process

    def faultproxy(self, routes: dict[int, int]):
        """A started TCP fault proxy process, stopped with the pool."""
        from .faultproxy import FaultProxy

        proxy = FaultProxy(self.workdir, routes)
        self.others.append(proxy)
        return proxy.start()

    def cleanup(self) -> None:
        for process in self.started:
            process.kill()
        for other in self.others:
            other.stop()


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    processes = ProcessPool(tmp_path)
    try:
        yield processes
    finally:
        processes.cleanup()


@pytest.fixture
def proxies(tmp_path: Path) -> Iterator:
    """HAProxy / nginx processes (tests/proxies.py), stopped by PID at the end."""
    from .proxies import ProxyPool

    started = ProxyPool(tmp_path)
    try:
        yield started
    finally:
        started.cleanup()


def pytest_addoption(parser) -> None:
    group = parser.getgroup("dqid fault scenarios")
    group.addoption(
        "--soak", action="store_true",
        help="run the fault scenarios longer (more messages), with 10 seeds "
             "unless --seeds says otherwise",
    )
    group.addoption(
        "--seeds", type=int, default=None,
        help="seeds per fault scenario (default 1: seed 1, as in CI)",
    )


def pytest_generate_tests(metafunc) -> None:
    if "seed" in metafunc.fixturenames:
        config = metafunc.config
        count = config.getoption("--seeds") or (10 if config.getoption("--soak") else 1)
        metafunc.parametrize("seed", range(1, count + 1))


@pytest.fixture
def soak(request) -> bool:
    """True when the fault scenarios should run longer (--soak)."""
    return bool(request.config.getoption("--soak"))


# The checker's figures of every fault scenario, printed at the end of the run.
FAULT_FIGURES: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    if FAULT_FIGURES:
        terminalreporter.section("dqid fault scenarios: the checker's figures")
        for line in FAULT_FIGURES:
            terminalreporter.write_line(line)

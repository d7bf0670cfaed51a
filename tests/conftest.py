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

    def node(self, node_id: str, *args: str, **kw) -> DqidProcess:
        process = DqidProcess(self.workdir, node_id, list(args), **kw)
        self.started.append(process)
        return process

    def cleanup(self) -> None:
        for process in self.started:
            process.kill()


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ProcessPool]:
    processes = ProcessPool(tmp_path)
    try:
        yield processes
    finally:
        processes.cleanup()

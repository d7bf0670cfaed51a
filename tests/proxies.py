"""HAProxy and nginx in front of real dqid nodes, with the configs from etc/.

The configs in etc/ are templates with ``{{NAME}}`` placeholders; here they
are rendered by plain substitution (nothing else is changed, so what runs is
what is committed), checked with the proxy's own config test, and the proxy
is run in the foreground as a subprocess.  Proxies are only ever signalled
by their own PID (or, for a last-resort SIGKILL, the process group that
their start created).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .procs import Reply, http, wait_for_200

ETC = Path(__file__).resolve().parent.parent / "etc"
HAPROXY_CFG = ETC / "haproxy.cfg"
NGINX_CONF = ETC / "nginx.conf"

_PLACEHOLDER = re.compile(r"\{\{[A-Za-z0-9_]+\}\}")


def find_tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise FileNotFoundError(f"{name} is not installed")
    return path


def render(template: Path, values: dict[str, str]) -> str:
    """``template`` with every ``{{NAME}}`` replaced by ``values[NAME]``."""
    text = template.read_text()
    for name, value in values.items():
        marker = "{{%s}}" % name
        assert marker in text, f"{template.name} has no {marker}"
        text = text.replace(marker, value)
    left = sorted(set(_PLACEHOLDER.findall(text)))
    assert not left, f"{template.name}: placeholders not rendered: {left}"
    return text


def node_values(listen_port: int, node_ports: Sequence[int]) -> dict[str, str]:
    assert len(node_ports) == 3, "the configs in etc/ are for a 3-node cluster"
    values = {"LISTEN": f"127.0.0.1:{listen_port}"}
    for index, port in enumerate(node_ports, start=1):
        values[f"NODE{index}"] = f"127.0.0.1:{port}"
    return values


@dataclass
class ProxyProcess:
    """One proxy process in the foreground, with its log in ``workdir``."""

    name: str
    workdir: Path
    port: int
    command: list[str]
    config: Path
    proc: subprocess.Popen | None = None
    extra_logs: list[Path] = field(default_factory=list)

    @property
    def out_path(self) -> Path:
        return self.workdir / f"{self.name}.out"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "ProxyProcess":
        with open(self.out_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, cwd=self.workdir, start_new_session=True,
            )
        return self

    def http(self, method: str, path: str, body: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 10.0) -> Reply:
        return http(self.port, method, path, body, headers, timeout)

    def wait_for(self, path: str = "/health", timeout: float = 15.0) -> Reply:
        """Poll ``path`` through the proxy until it answers 200."""
        return wait_for_200(self.http, path, timeout, self.proc, self.name, self.log_tail)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM by PID; SIGKILL if it has not gone within ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL the process group this proxy's start created (the proxy
        and its own workers, nothing else), and reap."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)

    def log_text(self) -> str:
        parts = []
        for path in (self.out_path, *self.extra_logs):
            if path.exists():
                parts.append(f"--- {path.name}\n" + path.read_text(errors="replace"))
        return "\n".join(parts)

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def _check(command: list[str], what: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{what} config check failed:\n{done.stdout}{done.stderr}"


def start_haproxy(workdir: Path, listen_port: int, node_ports: Sequence[int],
                  binary: str | None = None, timeout: float = 15.0) -> ProxyProcess:
    """Render etc/haproxy.cfg into ``workdir``, check it, run ``haproxy -db``
    and wait until GET /health answers 200 through it."""
    binary = binary or find_tool("haproxy")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "haproxy.cfg"
    config.write_text(render(HAPROXY_CFG, node_values(listen_port, node_ports)))
    _check([binary, "-c", "-f", str(config)], "haproxy")
    proxy = ProxyProcess("haproxy", workdir, listen_port,
                         [binary, "-db", "-f", str(config)], config)
    return _launch(proxy, timeout)


def _launch(proxy: ProxyProcess, timeout: float) -> ProxyProcess:
    """Start ``proxy`` and wait until GET /health answers through it."""
    proxy.start()
    try:
        proxy.wait_for("/health", timeout)
    except BaseException:
        proxy.stop()
        raise
    return proxy


def start_nginx(workdir: Path, listen_port: int, node_ports: Sequence[int],
                binary: str | None = None, timeout: float = 15.0) -> ProxyProcess:
    """Render etc/nginx.conf into ``workdir`` (also its RUN_DIR), check it
    with ``nginx -t``, run it in the foreground (the config says
    ``daemon off``) and wait until GET /health answers 200 through it."""
    binary = binary or find_tool("nginx")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    values = node_values(listen_port, node_ports)
    values["RUN_DIR"] = str(workdir)
    values["USER"] = pwd.getpwuid(os.geteuid()).pw_name
    config = workdir / "nginx.conf"
    config.write_text(render(NGINX_CONF, values))
    base = [binary, "-p", str(workdir), "-c", str(config)]
    _check([*base, "-t"], "nginx")
    proxy = ProxyProcess("nginx", workdir, listen_port, base, config,
                         extra_logs=[workdir / "error.log"])
    return _launch(proxy, timeout)


STARTERS = {"haproxy": start_haproxy, "nginx": start_nginx}


class ProxyPool:
    """Starts proxies for one test and stops every one at its end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[ProxyProcess] = []

    def start(self, kind: str, listen_port: int, node_ports: Sequence[int],
              binary: str | None = None) -> ProxyProcess:
        proxy = STARTERS[kind](self.workdir / f"{kind}-{len(self.started)}",
                               listen_port, node_ports, binary)
        self.started.append(proxy)
        return proxy

    def cleanup(self) -> None:
        for proxy in self.started:
            proxy.stop()

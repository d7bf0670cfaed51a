"""A TCP fault proxy for partition tests, run as its own process.

    python -m tests.faultproxy --control PORT --route LISTEN=TARGET [--route ...]

Each route forwards connections from 127.0.0.1:LISTEN to 127.0.0.1:TARGET and
has a mode:

``pass``
    forward bytes both ways (with flow control); a close on one side closes
    the other.
``blackhole``
    a partition: connections are still accepted, every byte read from either
    side is dropped, and nothing is ever closed -- not even when one side
    closes.  Connections that already exist go silent too.
``reset``
    every connection of the route is aborted with RST at once, and so is
    every new one as soon as it is accepted.

Leaving ``blackhole`` aborts (RST, both sides) every connection that lived
through it: bytes were dropped, so its stream has a hole and cannot resume;
the client reconnects through the restored route like after a long
partition.  Changing a route's target aborts its existing connections; new
connections go to the new target.  A pass connection whose target refuses is
aborted.

Control is plain HTTP on 127.0.0.1:CONTROL:

    POST /route/LISTEN/mode/MODE   -> 204
    POST /route/LISTEN/target/PORT -> 204
    GET  /routes  -> 200 {"LISTEN": {"target": T, "mode": M, "connections": N}}
    GET  /health  -> 200 {"status": "ok"}

Unknown route or path: 404; bad mode or port: 400; wrong method: 405; errors
are JSON ``{"error": ..., "message": ...}``.  The process logs only warnings
and errors (to stderr) and exits 0 on SIGTERM.

``FaultProxy`` at the bottom is the synchronous handle tests use.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
)
from twisted.internet.protocol import Factory, Protocol

from .procs import free_port, http, stop_process

MODES = ("pass", "blackhole", "reset")
REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------
# The proxy (runs inside the proxy process)


class Route:
    """One LISTEN -> TARGET forwarding rule and its live connection pairs."""

    def __init__(self, reactor: Any, listen: int, target: int, mode: str = "pass") -> None:
        self.reactor = reactor
        self.listen = listen
        self.target = target
        self.mode = mode
        # A pair stays here until both of its sides are closed.
        self.pairs: set[Inbound] = set()

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(mode)
        self.mode = mode
        for pair in list(self.pairs):
            if mode == "reset":
                pair.abort()
            elif mode == "blackhole":
                pair.silence()
            elif pair.silenced:  # back to pass: a stream with a hole dies
                pair.abort()

    def retarget(self, target: int) -> None:
        self.target = target
        for pair in list(self.pairs):
            pair.abort()

    def describe(self) -> dict[str, Any]:
        return {"target": self.target, "mode": self.mode, "connections": len(self.pairs)}


class Throttle:
    """Flow control for one direction: when the writing side's buffer is
    full, pause reading on the other side.  Unlike registering the transport
    itself, a lost connection does not close the other side through
    ``stopProducing`` (the pair decides that), and a silenced pair keeps
    reading, so blackholed bytes are read and dropped."""

    def __init__(self, pair: "Inbound", transport: Any) -> None:
        self.pair = pair
        self.transport = transport

    def pauseProducing(self) -> None:
        if not self.pair.silenced:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


class Outbound(Protocol):
    """The proxy's connection to the target; reports everything to its pair."""

    def __init__(self, pair: "Inbound") -> None:
        self.pair = pair
        self.open = False

    def connectionMade(self) -> None:
        self.open = True

    def dataReceived(self, data: bytes) -> None:
        self.pair.from_target(data)

    def connectionLost(self, reason: Any) -> None:
        self.open = False
        self.pair.target_lost()


class Inbound(Protocol):
    """A client's connection to LISTEN; owns the pair (client, target)."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.silenced = False
        self.open = False
        self.outbound: Outbound | None = None
        self.connecting: defer.Deferred | None = None
        self.pending: list[bytes] = []

    # -- client side

    def connectionMade(self) -> None:
        self.open = True
        self.route.pairs.add(self)
        if self.route.mode == "reset":
            self.transport.abortConnection()
            return
        if self.route.mode == "blackhole":
            self.silenced = True  # accepted, never forwarded
            return
        self.transport.pauseProducing()  # until the target answers
        endpoint = TCP4ClientEndpoint(self.route.reactor, "127.0.0.1", self.route.target, timeout=5)
        self.connecting = connectProtocol(endpoint, Outbound(self))
        self.connecting.addCallbacks(self._connected, self._not_connected)

    def dataReceived(self, data: bytes) -> None:
        if self.silenced:
            return
        if self.outbound is None:
            self.pending.append(data)
        else:
            self.outbound.transport.write(data)

    def connectionLost(self, reason: Any) -> None:
        self.open = False
        if not self.silenced:
            if self.connecting is not None:
                self.connecting.cancel()
            elif self.outbound is not None and self.outbound.open:
                self.outbound.transport.loseConnection()
        self._forget_if_closed()

    # -- target side

    def _connected(self, outbound: Outbound) -> None:
        self.connecting = None
        self.outbound = outbound
        if not self.open:  # the client went away while we connected
            outbound.transport.abortConnection()
            return
        outbound.transport.registerProducer(Throttle(self, self.transport), True)
        self.transport.registerProducer(Throttle(self, outbound.transport), True)
        pending, self.pending = self.pending, []
        if not self.silenced:
            for data in pending:
                outbound.transport.write(data)
        self.transport.resumeProducing()

    def _not_connected(self, failure: Any) -> None:
        # Refused, timed out or cancelled (by abort or the client leaving).
        self.connecting = None
        if self.open and not self.silenced:  # a partition never closes anything
            self.abort()
        self._forget_if_closed()

    def from_target(self, data: bytes) -> None:
        if not self.silenced and self.open:
            self.transport.write(data)

    def target_lost(self) -> None:
        if not self.silenced and self.open:
            self.transport.loseConnection()
        self._forget_if_closed()

    # -- both

    def silence(self) -> None:
        """Blackhole: from now on read everything, forward and close nothing."""
        self.silenced = True
        self.pending = []
        if self.open:
            self.transport.resumeProducing()
        if self.outbound is not None and self.outbound.open:
            self.outbound.transport.resumeProducing()

    def abort(self) -> None:
        """RST on both sides (or stop connecting to the target)."""
        if self.open:
            self.transport.abortConnection()
        if self.connecting is not None:
            self.connecting.cancel()
        elif self.outbound is not None and self.outbound.open:
            self.outbound.transport.abortConnection()

    def _forget_if_closed(self) -> None:
        target_open = self.connecting is not None or (
            self.outbound is not None and self.outbound.open
        )
        if not self.open and not target_open:
            self.route.pairs.discard(self)


class RouteFactory(Factory):
    noisy = False

    def __init__(self, route: Route) -> None:
        self.route = route

    def buildProtocol(self, addr: Any) -> Inbound:
        return Inbound(self.route)


def control_site(routes: dict[int, Route]) -> Any:
    """The control HTTP server: a twisted.web Site over one leaf resource."""
    from twisted.web.resource import Resource
    from twisted.web.server import Site

    class Control(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            parts = [p.decode("utf-8", "replace") for p in request.postpath]
            while parts and parts[-1] == "":
                parts.pop()
            method = request.method.decode("ascii", "replace")
            try:
                status, body = self.dispatch(method, parts)
            except Exception as error:  # never a traceback page
                status, body = 500, _error("internal", repr(error))
            request.setResponseCode(status)
            if status == 204:
                return b""
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(body).encode() + b"\n"

        def dispatch(self, method: str, parts: list[str]) -> tuple[int, Any]:
            if parts in (["health"], ["routes"]):
                if method not in ("GET", "HEAD"):
                    return 405, _error("method_not_allowed", "use GET")
                if parts == ["health"]:
                    return 200, {"status": "ok"}
                return 200, {str(p): r.describe() for p, r in sorted(routes.items())}
            if len(parts) != 4 or parts[0] != "route" or parts[2] not in ("mode", "target"):
                return 404, _error("not_found", "no such path")
            if method != "POST":
                return 405, _error("method_not_allowed", "use POST")
            route = routes.get(_port(parts[1]) or -1)
            if route is None:
                return 404, _error("unknown_route", f"no route listens on {parts[1]}")
            if parts[2] == "mode":
                if parts[3] not in MODES:
                    return 400, _error("bad_mode", f"mode must be one of {', '.join(MODES)}")
                route.set_mode(parts[3])
                return 204, None
            target = _port(parts[3])
            if target is None:
                return 400, _error("bad_port", f"not a TCP port: {parts[3]}")
            route.retarget(target)
            return 204, None

    class QuietSite(Site):
        noisy = False

        def log(self, request: Any) -> None:  # no access log
            pass

    return QuietSite(Control())


def _error(code: str, message: str) -> dict[str, str]:
    return {"error": code, "message": message}


def _port(text: str) -> int | None:
    if text.isascii() and text.isdigit() and 0 < int(text) < 65536:
        return int(text)
    return None


def _route_arg(text: str) -> tuple[int, int]:
    listen, sep, target = text.partition("=")
    ports = (_port(listen), _port(target))
    if not sep or None in ports:
        raise argparse.ArgumentTypeError(f"expected LISTEN=TARGET ports, got {text!r}")
    return ports  # type: ignore[return-value]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.faultproxy", description=__doc__.split("\n")[0])
    parser.add_argument("--control", type=int, required=True, help="control HTTP port on 127.0.0.1")
    parser.add_argument("--route", type=_route_arg, action="append", required=True,
                        metavar="LISTEN=TARGET", help="forward 127.0.0.1:LISTEN to 127.0.0.1:TARGET")
    args = parser.parse_args(argv)
    listens = [listen for listen, _ in args.route]
    if len(set(listens)) != len(listens):
        parser.error("--route: a LISTEN port is given twice")
    return args


async def run(reactor: Any, args: argparse.Namespace) -> None:
    from twisted.internet.error import CannotListenError

    routes = {listen: Route(reactor, listen, target) for listen, target in args.route}
    try:
        for route in routes.values():
            endpoint = TCP4ServerEndpoint(reactor, route.listen, interface="127.0.0.1")
            await endpoint.listen(RouteFactory(route))
        endpoint = TCP4ServerEndpoint(reactor, args.control, interface="127.0.0.1")
        await endpoint.listen(control_site(routes))
    except CannotListenError as error:
        raise SystemExit(f"faultproxy: cannot listen on port {error.port}: {error.socketError}")
    await defer.Deferred()  # serve until SIGTERM/SIGINT stops the reactor


def main(argv: list[str] | None = None) -> None:
    from twisted.internet.task import react
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    args = parse_args(sys.argv[1:] if argv is None else argv)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])],
        redirectStandardIO=False,
    )
    react(run, [args])


# --------------------------------------------------------------------------
# The synchronous handle for tests


class FaultProxyError(RuntimeError):
    """The control server refused a request (bad route, mode or port)."""


class FaultProxy:
    """A ``python -m tests.faultproxy`` process, driven synchronously.

    ``routes`` maps LISTEN -> TARGET ports on 127.0.0.1; the control port is
    picked here.  The process is only ever signalled by its own PID.
    """

    def __init__(self, workdir: Path, routes: dict[int, int]) -> None:
        self.workdir = Path(workdir)
        self.initial_routes = dict(routes)
        self.control_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, "not started"
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / f"faultproxy-{self.control_port}.log"

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "tests.faultproxy", "--control", str(self.control_port)]
        for listen, target in self.initial_routes.items():
            command += ["--route", f"{listen}={target}"]
        return command

    def start(self) -> "FaultProxy":
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=REPO_ROOT, start_new_session=True,
            )
        deadline = time.monotonic() + 15.0
        last: Any = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"faultproxy exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                reply = http(self.control_port, "GET", "/health", timeout=2)
                if reply.status == 200:
                    return self
                last = reply.status
            except OSError as error:
                last = error
            time.sleep(0.05)
        self.stop()
        raise AssertionError(f"faultproxy /health not 200 in 15 s: {last}\n{self.log_text()}")

    def _post(self, path: str) -> None:
        reply = http(self.control_port, "POST", path, timeout=5)
        if reply.status != 204:
            raise FaultProxyError(f"POST {path}: {reply.status} {reply.body.decode(errors='replace').strip()}")

    def set_mode(self, listen: int, mode: str) -> None:
        """``pass``, ``blackhole`` or ``reset``; takes effect before this returns."""
        self._post(f"/route/{listen}/mode/{mode}")

    def retarget(self, listen: int, target: int) -> None:
        """New connections go to ``target``; existing ones are aborted."""
        self._post(f"/route/{listen}/target/{target}")

    def routes(self) -> dict[int, dict[str, Any]]:
        """{listen: {"target": int, "mode": str, "connections": int}} (int keys)."""
        reply = http(self.control_port, "GET", "/routes", timeout=5)
        if reply.status != 200:
            raise FaultProxyError(f"GET /routes: {reply.status}")
        return {int(listen): info for listen, info in reply.json().items()}

    def stop(self) -> int | None:
        """SIGTERM by PID, SIGKILL after 5 s; returns the exit code."""
        return stop_process(self.proc, 5)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


if __name__ == "__main__":
    main()

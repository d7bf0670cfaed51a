"""The fault proxy process in front of small line-echo servers."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from .faultproxy import FaultProxy, FaultProxyError
from .procs import free_port, http

TIMEOUT = 1.0  # how long a blackholed request is given


class EchoServer:
    """Answers every line with TAG + the line; counts the lines it got."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.lines = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buffer += data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    self.lines += 1
                    conn.sendall(self.tag + line + b"\n")

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.settimeout(TIMEOUT)
    return sock


def ask(sock: socket.socket, line: bytes) -> bytes:
    """Send one line and read one line back (b"" on EOF)."""
    sock.sendall(line + b"\n")
    answer = b""
    while not answer.endswith(b"\n"):
        data = sock.recv(65536)
        if not data:
            return answer
        answer += data
    return answer


def assert_silent_but_open(sock: socket.socket) -> None:
    """A request times out, and the connection was not closed meanwhile."""
    with pytest.raises(socket.timeout):
        ask(sock, b"anyone?")
    sock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):  # not EOF, not RST: just nothing
            sock.recv(1)
    finally:
        sock.settimeout(TIMEOUT)


def assert_fails(sock: socket.socket) -> None:
    """The connection is reset or closed: an error or EOF, never a timeout."""
    try:
        answer = ask(sock, b"hello?")
    except (ConnectionResetError, BrokenPipeError, ConnectionAbortedError):
        return
    assert answer == b""


def assert_new_connection_fails(port: int) -> None:
    try:
        sock = connect(port)
    except ConnectionResetError:
        return  # the RST can even beat connect() to the socket
    with sock:
        assert_fails(sock)


def wait_connections(proxy: FaultProxy, listen: int, count: int) -> None:
    deadline = time.monotonic() + 5
    while proxy.routes()[listen]["connections"] != count:
        assert time.monotonic() < deadline, proxy.routes()
        time.sleep(0.02)


@pytest.fixture
def echo() -> Iterator[tuple[EchoServer, EchoServer]]:
    a, b = EchoServer(b"A:"), EchoServer(b"B:")
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@pytest.fixture
def proxied(tmp_path: Path, echo) -> Iterator[tuple[FaultProxy, int, EchoServer, EchoServer]]:
    a, b = echo
    listen = free_port()
    proxy = FaultProxy(tmp_path, {listen: a.port})
    try:
        proxy.start()
        yield proxy, listen, a, b
    finally:
        proxy.stop()


def test_pass_forwards_both_ways(proxied) -> None:
    proxy, listen, a, _ = proxied
    assert proxy.routes() == {listen: {"target": a.port, "mode": "pass", "connections": 0}}
    with connect(listen) as one, connect(listen) as two:
        assert ask(one, b"hello") == b"A:hello\n"
        assert ask(two, b"there") == b"A:there\n"
        big = b"x" * 2_000_000  # more than any socket buffer: flow control
        assert ask(one, big) == b"A:" + big + b"\n"
        assert proxy.routes()[listen]["connections"] == 2
    wait_connections(proxy, listen, 0)


def test_blackhole_silences_old_and_new_connections(proxied) -> None:
    proxy, listen, a, _ = proxied
    old = connect(listen)
    assert ask(old, b"before") == b"A:before\n"
    lines = a.lines

    proxy.set_mode(listen, "blackhole")
    assert proxy.routes()[listen]["mode"] == "blackhole"
    assert_silent_but_open(old)
    new = connect(listen)  # still accepted
    assert_silent_but_open(new)
    assert a.lines == lines  # nothing reached the target
    assert proxy.routes()[listen]["connections"] == 2

    # Back to pass: the connections that lost bytes are reset, new ones work.
    proxy.set_mode(listen, "pass")
    assert_fails(old)
    assert_fails(new)
    with connect(listen) as fresh:
        assert ask(fresh, b"after") == b"A:after\n"
    old.close()
    new.close()
    wait_connections(proxy, listen, 0)


def test_blackhole_never_closes_even_when_the_target_does(proxied) -> None:
    proxy, listen, a, _ = proxied
    sock = connect(listen)
    assert ask(sock, b"hi") == b"A:hi\n"
    proxy.set_mode(listen, "blackhole")
    a.close()  # the target goes away; the client must not notice
    time.sleep(0.1)
    sock.sendall(b"y" * 5_000_000)  # read and dropped, so this never blocks
    assert_silent_but_open(sock)
    sock.close()


def test_reset_aborts_existing_and_new_connections(proxied) -> None:
    proxy, listen, a, _ = proxied
    old = connect(listen)
    assert ask(old, b"before") == b"A:before\n"

    proxy.set_mode(listen, "reset")
    started = time.monotonic()
    assert_fails(old)
    for _ in range(3):
        assert_new_connection_fails(listen)
    assert time.monotonic() - started < TIMEOUT  # at once, not by timing out
    wait_connections(proxy, listen, 0)

    proxy.set_mode(listen, "pass")
    with connect(listen) as sock:
        assert ask(sock, b"again") == b"A:again\n"
    old.close()


def test_retarget_moves_new_connections(proxied) -> None:
    proxy, listen, a, b = proxied
    old = connect(listen)
    assert ask(old, b"one") == b"A:one\n"

    proxy.retarget(listen, b.port)
    assert proxy.routes()[listen]["target"] == b.port
    assert_fails(old)
    with connect(listen) as sock:
        assert ask(sock, b"two") == b"B:two\n"

    proxy.retarget(listen, a.port)
    with connect(listen) as sock:
        assert ask(sock, b"three") == b"A:three\n"
    old.close()


def test_target_down_resets_the_client(tmp_path: Path) -> None:
    listen, nobody = free_port(), free_port()
    proxy = FaultProxy(tmp_path, {listen: nobody})
    try:
        proxy.start()
        assert_new_connection_fails(listen)
        wait_connections(proxy, listen, 0)
    finally:
        proxy.stop()


def test_control_errors(proxied) -> None:
    proxy, listen, _, _ = proxied
    port = proxy.control_port
    assert http(port, "GET", "/health").status == 200
    assert http(port, "POST", f"/route/{listen}/mode/flaky").status == 400
    assert http(port, "POST", f"/route/{listen}/target/0").status == 400
    assert http(port, "POST", "/route/1/mode/pass").status == 404
    assert http(port, "POST", f"/route/{listen}/speed/1").status == 404
    assert http(port, "GET", "/nothing").status == 404
    assert http(port, "GET", f"/route/{listen}/mode/pass").status == 405
    reply = http(port, "POST", f"/route/{listen}/mode/flaky")
    assert reply.json()["error"] == "bad_mode"
    with pytest.raises(FaultProxyError):
        proxy.set_mode(listen, "flaky")
    with pytest.raises(FaultProxyError):
        proxy.retarget(listen + 1 if listen < 65535 else listen - 1, 80)
    assert proxy.routes()[listen]["mode"] == "pass"


def test_sigterm_exits_cleanly_and_quietly(tmp_path: Path, echo) -> None:
    a, _ = echo
    listen = free_port()
    proxy = FaultProxy(tmp_path, {listen: a.port}).start()
    try:
        with connect(listen) as sock:
            assert ask(sock, b"x") == b"A:x\n"
            assert proxy.stop() == 0
            assert_fails(sock)
        assert proxy.log_text() == ""
    finally:
        proxy.stop()

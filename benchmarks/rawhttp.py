"""A minimal keep-alive HTTP/1.1 client on a raw socket, for load.

It parses only what the benchmark needs (status, Content-Length, chunked
bodies, Connection: close), so that the client costs little CPU.
"""

from __future__ import annotations

import socket

REQUEST_TIMEOUT = 30.0  # seconds one request may take before it counts as hung


class RawConn:
    """One keep-alive connection to 127.0.0.1:``port``."""

    __slots__ = ("port", "sock", "buf")

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buf = b""

    def connect(self) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=REQUEST_TIMEOUT)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.buf = b""

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = None
        self.buf = b""

    def _more(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        return chunk

    def request(self, data: bytes) -> tuple[int, bytes, bytes]:
        """Send one whole request; (status, raw head, body)."""
        if self.sock is None:
            self.connect()
        self.sock.sendall(data)
        buf = self.buf
        while True:
            i = buf.find(b"\r\n\r\n")
            if i >= 0:
                break
            buf += self._more()
        head = buf[:i + 2]  # keeps the last header's CRLF
        buf = buf[i + 4:]
        status = int(head[9:12])
        lower = head.lower()
        j = lower.find(b"\r\ncontent-length:")
        if j >= 0:
            n = int(lower[j + 17:lower.find(b"\r\n", j + 2)])
            while len(buf) < n:
                buf += self._more()
            body, buf = buf[:n], buf[n:]
        elif status == 204 or status == 304 or status < 200:
            body = b""
        elif b"\r\ntransfer-encoding: chunked\r\n" in lower:
            body, buf = self._chunked(buf)
        else:  # body up to close
            parts = [buf]
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                parts.append(chunk)
            self.close()
            return status, head, b"".join(parts)
        self.buf = buf
        if b"\r\nconnection: close\r\n" in lower:
            self.close()
        return status, head, body

    def _chunked(self, buf: bytes) -> tuple[bytes, bytes]:
        parts = []
        while True:
            while (i := buf.find(b"\r\n")) < 0:
                buf += self._more()
            size = int(buf[:i].split(b";", 1)[0], 16)
            buf = buf[i + 2:]
            if size == 0:
                while True:  # trailers up to an empty line
                    while (i := buf.find(b"\r\n")) < 0:
                        buf += self._more()
                    line, buf = buf[:i], buf[i + 2:]
                    if not line:
                        return b"".join(parts), buf
            while len(buf) < size + 2:
                buf += self._more()
            parts.append(buf[:size])
            buf = buf[size + 2:]


def header(head: bytes, name: bytes) -> bytes | None:
    """A header's value from a raw head (``name`` lower case)."""
    j = head.lower().find(b"\r\n" + name + b":")
    if j < 0:
        return None
    start = j + len(name) + 3
    return head[start:head.find(b"\r\n", start)].strip()

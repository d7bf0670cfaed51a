"""Bearer tokens and HTTPS on a real node, through real sockets."""

from __future__ import annotations

import http.client
import signal
import ssl
import time

import pytest

from .procs import free_port
from .tls_certs import make_pki

pytestmark = pytest.mark.process

AUTH = {"Authorization": "Bearer token-one"}


def test_tokens_guard_everything_but_health_and_ready(pool, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\n\ntoken-one\n  token-two  \n")
    node = pool.node("t", f"--http-token-file={tokens}").start()
    node.wait_for("/ready")
    assert node.http("GET", "/health").status == 200
    for method, path in [("POST", "/push"), ("GET", "/get"), ("GET", "/stats"),
                         ("POST", "/ack/t.1.1"), ("GET", "/nowhere"), ("HEAD", "/health"),
                         ("POST", "/ready")]:
        reply = node.http(method, path, b"x" if method == "POST" else None)
        assert reply.status == 401, (method, path, reply)
        assert reply.headers["www-authenticate"].startswith("Bearer")
        if method != "HEAD":
            assert reply.json()["error"] == "unauthorized"
    for header in ["Bearer token-three", "Basic dG9rZW4tb25lOg==", "Bearer", "token-one",
                   "Bearer token-one2", "Bearer token-on"]:
        assert node.http("GET", "/stats", headers={"Authorization": header}).status == 401
    pushed = node.http("POST", "/push", b"job", headers=AUTH)
    assert pushed.status == 201
    got = node.http("GET", "/get", headers={"Authorization": "bearer  token-two"})
    assert got.status == 200 and got.body == b"job"
    assert node.http("POST", f"/ack/{pushed.json()['id']}", headers=AUTH).status == 204


def test_sighup_reads_the_token_file_again(pool, tmp_path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("token-one\n")
    node = pool.node("t", f"--http-token-file={tokens}").start()
    node.wait_for("/ready")
    new = {"Authorization": "Bearer token-new"}
    assert node.http("GET", "/stats", headers=new).status == 401

    tokens.write_text("token-new\n")
    node.signal(signal.SIGHUP)
    _until(lambda: node.http("GET", "/stats", headers=new).status == 200)
    assert node.http("GET", "/stats", headers=AUTH).status == 401  # revoked

    tokens.write_text("# nothing left: an error, the tokens in use stay\n")
    node.signal(signal.SIGHUP)
    _until(lambda: "kept the HTTP tokens in use" in node.log_text())
    assert node.http("GET", "/stats", headers=new).status == 200
    assert node.alive()


def test_https_endpoint(pool, tmp_path) -> None:
    pki = make_pki(tmp_path / "pki", ["t"])
    files = pki.nodes["t"]
    port = free_port()
    node = pool.node("t", http_port=port)
    node.args.append(f"--http=ssl:{port}:interface=127.0.0.1:"
                     f"privateKey={files.key}:certKey={files.cert}")
    node.start()
    context = ssl.create_default_context(cafile=str(files.ca))

    def request(method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=5)
        try:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    _until(lambda: _quietly(request, "GET", "/ready") == 200, timeout=20)
    status, body = request("POST", "/push", b"over tls")
    assert status == 201
    assert request("GET", "/get") == (200, b"over tls")
    # Plain HTTP to the TLS port gets no answer.
    with pytest.raises((OSError, http.client.HTTPException)):
        node.http("GET", "/health", timeout=2)
    # A client that does not trust the CA refuses the server.
    with pytest.raises(ssl.SSLError):
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5,
                                           context=ssl.create_default_context())
        conn.request("GET", "/health")


def _quietly(request, *args):
    try:
        return request(*args)[0]
    except (OSError, http.client.HTTPException):
        return None


def _until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("not true in time")

"""BearerGate in front of the API (StubTreq, no sockets)."""

from __future__ import annotations

import pytest
from treq.testing import StubTreq
from twisted.internet.task import Clock

from dqid.http_auth import BearerGate
from dqid.node import QueueNode
from dqid.tokens import TokenSet
from dqid.web import HttpApi

from .helpers import successResultOf


@pytest.fixture
def client(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("good-token\n")
    node = QueueNode("n", 10, Clock(), epoch=1)
    gate = BearerGate(HttpApi(node, 1024).resource(), TokenSet(tokens))
    return StubTreq(gate), node


def call(stub, method, path, token=None, body=b""):
    headers = {"Authorization": [f"Bearer {token}"]} if token else {}
    response = successResultOf(stub.request(method, "http://n" + path, headers=headers,
                                            data=body or None))
    return response, successResultOf(stub.content(response))


@pytest.mark.parametrize("path", ["/health", "/ready"])
def test_probes_need_no_token(client, path):
    stub, _ = client
    response, _ = call(stub, "GET", path)
    assert response.code == 200


@pytest.mark.parametrize("method, path", [
    ("POST", "/push"), ("GET", "/get"), ("GET", "/stats"), ("POST", "/ack/n.1.1"),
    ("POST", "/health"), ("GET", "/missing")])
def test_anything_else_without_the_token_is_401_and_changes_nothing(client, method, path):
    stub, node = client
    response, body = call(stub, method, path, body=b"job" if method == "POST" else b"")
    assert response.code == 401
    assert response.headers.getRawHeaders("WWW-Authenticate")[0].startswith("Bearer")
    assert b'"error":"unauthorized"' in body.replace(b" ", b"")
    assert node.queue.depth == 0


def test_the_token_lets_requests_through(client):
    stub, node = client
    response, _ = call(stub, "POST", "/push", token="good-token", body=b"job")
    assert response.code == 201 and node.queue.depth == 1
    response, _ = call(stub, "POST", "/push", token="bad-token", body=b"job")
    assert response.code == 401 and node.queue.depth == 1


@pytest.mark.parametrize("path, content_type", [
    ("/ui", "text/html"), ("/ui/dashboard.js", "text/javascript"),
    ("/ui/dashboard.css", "text/css")])
def test_the_dashboard_files_need_no_token(client, path, content_type):
    stub, _ = client
    response, body = call(stub, "GET", path)
    assert response.code == 200 and body
    assert response.headers.getRawHeaders("Content-Type")[0].startswith(content_type)


@pytest.mark.parametrize("method, path", [
    ("GET", "/cluster"), ("GET", "/held"), ("GET", "/messages/n.1.1"),
    ("POST", "/kick/n.1.1"), ("POST", "/ui"), ("GET", "/ui/other"), ("GET", "/ui/")])
def test_what_the_dashboard_reads_and_writes_needs_the_token(client, method, path):
    stub, _ = client
    response, _ = call(stub, method, path)
    assert response.code == 401

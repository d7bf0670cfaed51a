"""Routing errors: 404 not_found for unknown paths, 405 method_not_allowed
with an Allow header.

See :mod:`tests.web_harness` for the harness."""

from __future__ import annotations

import pytest

from .web_harness import assert_error, h, make


# -- routing errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path",
    [("GET", "/"), ("GET", "/nope"), ("POST", "/push/nope"), ("GET", "/v2/get"),
     ("POST", "/ack/a/b"), ("GET", "/stats/x")],
)
def test_unknown_path_is_404_not_found(h, method, path):
    assert_error(h.call(method, path), 404, "not_found")


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("GET", "/push", {"POST"}),
        ("PUT", "/push", {"POST"}),
        ("GET", "/push/batch", {"POST"}),
        ("DELETE", "/get", {"GET", "POST"}),
        ("GET", "/ack/n1.1.1", {"POST"}),
        ("GET", "/nack/n1.1.1", {"POST"}),
        ("GET", "/touch/n1.1.1", {"POST"}),
        ("POST", "/stats", {"GET"}),
        ("POST", "/health", {"GET"}),
        ("POST", "/ready", {"GET"}),
    ],
)
def test_wrong_method_is_405_method_not_allowed(h, method, path, allowed):
    reply = h.call(method, path, b"x" if method in ("POST", "PUT") else None)
    assert_error(reply, 405, "method_not_allowed")
    allow = {m.strip() for m in (reply.header("Allow") or "").split(",")}
    assert allowed <= allow
    assert h.stats()["depth"] == 0

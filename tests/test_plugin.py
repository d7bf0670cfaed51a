"""The twistd plugin and the service it builds (dqid.tap), without running
the reactor: services are started against a ``MemoryReactorClock``."""

from __future__ import annotations

import json

import pytest
from twisted.application.service import IServiceMaker, MultiService
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.plugin import getPlugins

from dqid import tap
from dqid.httpbody import BoundedRequest
from dqid.options import TwistdOptions
from dqid.timings import DEFAULT_TIMINGS

from .helpers import assertNoResult, successResultOf

HTTP = "tcp:0:interface=127.0.0.1"


def dqid_makers() -> list:
    return [maker for maker in getPlugins(IServiceMaker) if maker.tapname == "dqid"]


def config(*args: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions([f"--http={HTTP}", "--node-id=t1", *args])
    return options


def children(service: MultiService, kind: type) -> list:
    return [child for child in service if isinstance(child, kind)]


def http_get(site, path: bytes) -> tuple[int, bytes]:
    """One request through the site's real HTTP protocol, no socket."""
    site.reactor = Clock()  # connection timeouts: never run
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(b"GET %s HTTP/1.0\r\nHost: x\r\n\r\n" % path)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    protocol.connectionLost(None)
    return int(head.split()[1]), body


def test_twistd_finds_the_dqid_plugin():
    (maker,) = dqid_makers()
    assert maker.options is TwistdOptions
    assert maker.description


def test_make_service_builds_the_node_and_its_http_listener():
    reactor = MemoryReactorClock()
    service = tap.makeService(config("--size=7", "--max-message-bytes=100"), reactor)
    assert isinstance(service, MultiService)
    (node_service,) = children(service, tap.NodeService)
    (listener,) = children(service, tap.ListenService)
    assert len(list(service)) == 2
    assert listener.what == "http"
    assert listener.description == HTTP
    node = node_service.node
    assert (node.node_id, node.queue.size, node.stats()["min_copies"]) == ("t1", 7, 1)
    assert reactor.tcpServers == []  # nothing listens before start


def test_started_service_listens_for_http_only_and_serves_the_api():
    reactor = MemoryReactorClock()
    service = tap.makeService(config("--max-message-bytes=100"), reactor)
    service.privilegedStartService()
    service.startService()
    try:
        # No --peer: a standalone node opens no AMP port.
        ((port, site, _backlog, interface),) = reactor.tcpServers
        assert (port, interface) == (0, "127.0.0.1")
        assert issubclass(site.requestFactory, BoundedRequest)
        assert site.requestFactory.max_body == 100
        status, body = http_get(site, b"/health")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        status, body = http_get(site, b"/ready")
        assert (status, json.loads(body)) == (200, {"status": "ready"})
    finally:
        stopped = service.stopService()
    reactor.advance(DEFAULT_TIMINGS.shutdown_grace)
    successResultOf(stopped)


def test_stopping_shuts_the_node_down_with_a_grace_period():
    reactor = MemoryReactorClock()
    service = tap.makeService(config(), reactor)
    (node_service,) = children(service, tap.NodeService)
    service.privilegedStartService()
    service.startService()
    assert node_service.node.readiness.reason() is None

    stopped = service.stopService()
    assert node_service.node.readiness.refusal() is not None  # refuses writes at once
    assertNoResult(stopped)  # answered long polls still get to flush
    reactor.advance(DEFAULT_TIMINGS.shutdown_grace)
    successResultOf(stopped)
    assert reactor.getDelayedCalls() == []


class BusyReactor(MemoryReactorClock):
    def listenTCP(self, port, factory, backlog=50, interface=""):
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


def test_a_port_that_cannot_be_bound_ends_start_up_with_a_message():
    service = tap.makeService(config(), BusyReactor())
    with pytest.raises(SystemExit) as caught:
        service.privilegedStartService()
    message = str(caught.value.code)
    assert message.startswith("dqid: error:")
    assert HTTP in message
    assert "Address already in use" in message

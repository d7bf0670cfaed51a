"""The HTTP plumbing over Twisted's and Klein's public surface.

* ``LeanKleinResource`` answers every request as Klein's own resource
  (``app.resource()``) answers it, status, body and headers a client reads;
  what it renders itself is framed with a Content-Length.
* ``bounded_site``: each request, pipelined ones too, gets the body limit of
  its own target before its body arrives (``BoundedChannel`` relies on
  HTTPChannel passing every line of a request's head to ``lineReceived``).
* ``tap.ListenService`` listens while it runs, and a port that cannot be
  bound ends start-up with one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from klein import Klein
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import CannotListenError, ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource
from twisted.web.server import Site
from werkzeug.exceptions import HTTPException

from dqid import tap
from dqid.httpbody import bounded_site
from dqid.lean_resource import LeanKleinResource

from .helpers import assertNoResult, successResultOf


# -- a small HTTP/1.1 client over a StringTransport ----------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]  # lower-case names; the last value of each
    body: bytes


def parse_answers(raw: bytes) -> list[Answer]:
    """Every answer in ``raw``: Content-Length, chunked, or none (204)."""
    answers = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"content-length" in headers:
            size = int(headers[b"content-length"])
            body, raw = raw[:size], raw[size:]
        elif headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line, _, raw = raw.partition(b"\r\n")
                size = int(size_line, 16)
                body, raw = body + raw[:size], raw[size + 2:]
                if size == 0:
                    break
        else:
            body = b""
        answers.append(Answer(int(status_line.split()[1]), headers, body))
    return answers


class Connection:
    """One client connection to ``site``'s real HTTP protocol."""

    def __init__(self, site: Site) -> None:
        site.reactor = Clock()  # connection timeouts: never run
        self.protocol = site.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def answers(self) -> list[Answer]:
        return parse_answers(self.transport.value())

    def close(self) -> None:
        self.protocol.connectionLost(Failure(ConnectionDone()))


def one_exchange(site: Site, data: bytes) -> Answer:
    connection = Connection(site)
    connection.send(data)
    connection.close()
    (answer,) = connection.answers()
    return answer


# -- LeanKleinResource -------------------------------------------------------------------------


class Routes:
    """A Klein app shaped like dqid's: bytes now, a Deferred later, errors."""

    app = Klein()

    def __init__(self) -> None:
        self.waiting: list[Deferred] = []
        self.cancelled: list[Deferred] = []

    @app.route("/fixed", methods=["POST"])
    def fixed(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain")
        return b"fixed"

    @app.route("/item/<name>", methods=["GET", "POST"])
    def item(self, request: IRequest, name: str) -> bytes:
        return name.encode("utf-8")

    @app.route("/text", methods=["GET"])
    def text(self, request: IRequest) -> Deferred:
        return succeed("text, later")

    @app.route("/later", methods=["GET"])
    def later(self, request: IRequest) -> Deferred:
        waiting: Deferred = Deferred(self.cancelled.append)
        self.waiting.append(waiting)
        return waiting

    @app.route("/empty", methods=["POST"])
    def empty(self, request: IRequest) -> bytes:
        request.setResponseCode(204)
        return b""

    @app.route("/fails", methods=["GET"])
    def fails(self, request: IRequest) -> bytes:
        raise ValueError("no")

    @app.route("/fails/later", methods=["GET"])
    def fails_later(self, request: IRequest) -> Deferred:
        return Deferred.fromCoroutine(self._fail())

    async def _fail(self) -> bytes:
        raise ValueError("no, later")

    @app.handle_errors(Exception)
    def error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        if isinstance(error, HTTPException):
            request.setResponseCode(error.code or 500)
            for name, value in error.get_headers():
                if name.lower() in ("allow", "location"):
                    request.setHeader(name.encode("ascii"), value.encode("latin-1"))
        else:
            request.setResponseCode(500)
        return b"error: " + type(error).__name__.encode("ascii")


def lean_site(routes: Routes) -> Site:
    return Site(LeanKleinResource(routes.app, routes.error))


METHODS = [b"GET", b"POST", b"HEAD", b"PUT"]
PATHS = [
    b"/fixed", b"/fixed/", b"//fixed", b"/fixed?x=1", b"/item/x", b"/item/%C3%A9",
    b"/item/", b"/item/a/b", b"/text", b"/empty", b"/fails",
    b"/fails/later", b"/nope", b"/",
]
READ_HEADERS = (b"content-type", b"location", b"allow")


def test_every_answer_is_the_one_klein_gives():
    routes = Routes()
    klein_site, our_site = Site(routes.app.resource()), lean_site(routes)
    mismatches = []
    for method in METHODS:
        for path in PATHS:
            request = b"%s %s HTTP/1.1\r\nHost: dqid.test\r\nContent-Length: 0\r\n\r\n" % (
                method, path)
            klein = one_exchange(klein_site, request)
            lean = one_exchange(our_site, request)
            seen = [
                (answer.status, answer.body, [answer.headers.get(h) for h in READ_HEADERS])
                for answer in (klein, lean)
            ]
            if seen[0] != seen[1]:
                mismatches.append((method, path, *seen))
    assert mismatches == []


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("head", [
    b"/item/%FF HTTP/1.1\r\nHost: dqid.test", b"/nope HTTP/1.1\r\nHost: \xff"])
def test_a_url_or_host_that_is_not_utf8_goes_to_the_apps_error_handler(method, head):
    """Klein answers these 400 too, but logs a traceback for each one."""
    answer = one_exchange(lean_site(Routes()),
                          method + b" " + head + b"\r\nContent-Length: 0\r\n\r\n")
    assert answer.status == 400
    if method != b"HEAD":
        assert answer.body == b"error: BadRequest"


@pytest.mark.parametrize(
    "request_line, body",
    [(b"POST /fixed", b"fixed"), (b"GET /item/x", b"x"), (b"GET /text", b"text, later")],
)
def test_a_matched_route_is_answered_with_a_content_length(request_line, body):
    answer = one_exchange(
        lean_site(Routes()), request_line + b" HTTP/1.1\r\nHost: dqid.test\r\n\r\n"
    )
    assert (answer.status, answer.body) == (200, body)
    assert answer.headers[b"content-length"] == b"%d" % len(body)
    assert b"transfer-encoding" not in answer.headers


def test_a_204_has_no_content_length():
    connection = Connection(lean_site(Routes()))
    connection.send(b"POST /empty HTTP/1.1\r\nHost: dqid.test\r\nContent-Length: 0\r\n\r\n")
    raw = connection.transport.value()
    assert raw.startswith(b"HTTP/1.1 204 ")
    assert b"content-length" not in raw.lower()
    assert b"transfer-encoding" not in raw.lower()


def test_a_later_answer_is_sent_when_it_fires():
    routes = Routes()
    connection = Connection(lean_site(routes))
    connection.send(b"GET /later HTTP/1.1\r\nHost: dqid.test\r\n\r\n")
    assert connection.transport.value() == b""
    (waiting,) = routes.waiting
    waiting.callback(b"now")
    (answer,) = connection.answers()
    assert (answer.status, answer.body, answer.headers[b"content-length"]) == (200, b"now", b"3")


def test_a_later_answer_is_cancelled_when_the_client_leaves():
    routes = Routes()
    connection = Connection(lean_site(routes))
    connection.send(b"GET /later HTTP/1.1\r\nHost: dqid.test\r\n\r\n")
    (waiting,) = routes.waiting
    connection.close()
    assert routes.cancelled == [waiting]
    assert connection.transport.value() == b""


# -- bounded_site: the body limit of each request's target --------------------------------------


class Stored(Resource):
    """Answers what the request kept of its body."""

    isLeaf = True

    def render(self, request: IRequest) -> bytes:
        too_large = request.body_too_large or request.content.overflowed
        return b"%d %s" % (len(request.content.getvalue()), b"over" if too_large else b"kept")


def post(path: bytes, body: bytes) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (path, len(body), body)


def post_chunked(path: bytes, body: bytes) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n0\r\n\r\n" % (path, len(body), body))


@pytest.mark.parametrize("encode", [post, post_chunked])
def test_each_pipelined_request_gets_the_limit_of_its_own_target(encode):
    connection = Connection(bounded_site(Stored(), max_body=8, max_batch_body=64))
    connection.send(
        encode(b"/push", b"x" * 8) + encode(b"/push", b"x" * 10)
        + encode(b"/push/batch", b"x" * 64) + encode(b"/push/batch?x=1", b"x" * 64)
        + encode(b"/ack", b"x" * 64) + encode(b"/ack", b"x" * 66)
        + encode(b"/push/batchx", b"x" * 10) + encode(b"/nack/n1.1.1", b"x" * 10)
    )
    assert [a.body.split()[1] for a in connection.answers()] == [
        b"kept", b"over", b"kept", b"kept", b"kept", b"over", b"over", b"over",
    ]


def test_a_stray_blank_line_between_requests_does_not_hide_the_next_target():
    connection = Connection(bounded_site(Stored(), max_body=8, max_batch_body=64))
    connection.send(post(b"/push", b"x" * 8) + b"\r\n" + post(b"/push/batch", b"x" * 64)
                    + post_chunked(b"/ack", b"x" * 64))
    assert [a.body for a in connection.answers()] == [b"8 kept", b"64 kept", b"64 kept"]


def test_a_body_announced_over_the_limit_is_not_stored():
    connection = Connection(bounded_site(Stored(), max_body=8, max_batch_body=64))
    connection.send(post(b"/push", b"x" * 1000) + post(b"/push/batch", b"y" * 1000))
    assert [a.body for a in connection.answers()] == [b"0 over", b"0 over"]


def test_a_chunked_body_over_the_limit_keeps_at_most_one_byte_more():
    connection = Connection(bounded_site(Stored(), max_body=8, max_batch_body=64))
    connection.send(post_chunked(b"/push", b"x" * 1000))
    assert [a.body for a in connection.answers()] == [b"9 over"]


# -- tap.ListenService -------------------------------------------------------------------------


HTTP = "tcp:8080:interface=127.0.0.1"


class RefusingReactor(MemoryReactorClock):
    def listenTCP(self, port, factory, backlog=50, interface=""):
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


class LaterEndpoint:
    """An endpoint whose listen completes when the test says."""

    def __init__(self) -> None:
        self.listening: Deferred = Deferred()

    def listen(self, factory: object) -> Deferred:
        return self.listening


class RecordingPort:
    def __init__(self) -> None:
        self.stop_calls = 0
        self.stopped: Deferred = Deferred()

    def stopListening(self) -> Deferred:
        self.stop_calls += 1
        return self.stopped


def listener(reactor: MemoryReactorClock) -> tap.ListenService:
    return tap.ListenService("http", HTTP, reactor, Site(Resource()))


def test_listens_on_its_endpoint_at_start():
    reactor = MemoryReactorClock()
    service = listener(reactor)
    assert reactor.tcpServers == []
    service.privilegedStartService()
    service.startService()  # does not listen twice
    ((port, factory, _backlog, interface),) = reactor.tcpServers
    assert (port, factory, interface) == (8080, service.factory, "127.0.0.1")


def test_start_service_alone_listens_too():
    reactor = MemoryReactorClock()
    listener(reactor).startService()
    assert len(reactor.tcpServers) == 1


def test_stopping_stops_listening_and_waits_for_it():
    service = listener(MemoryReactorClock())
    service.endpoint = endpoint = LaterEndpoint()
    service.privilegedStartService()
    service.startService()
    port = RecordingPort()
    endpoint.listening.callback(port)
    stopped = service.stopService()
    assert port.stop_calls == 1
    assertNoResult(stopped)
    port.stopped.callback(None)
    successResultOf(stopped)
    assert not service.running


def test_a_port_that_cannot_be_bound_ends_start_up_with_one_line():
    service = tap.ListenService("amp", HTTP, RefusingReactor(), Site(Resource()))
    with pytest.raises(SystemExit) as stopped:
        service.privilegedStartService()
    assert str(stopped.value.code) == (
        f"dqid: error: cannot listen for amp on {HTTP!r}: [Errno 98] Address already in use"
    )


def test_a_listen_that_fails_later_stops_the_reactor():
    reactor = MemoryReactorClock()
    service = listener(reactor)
    service.endpoint = endpoint = LaterEndpoint()
    service.privilegedStartService()
    assert not reactor.hasStopped
    endpoint.listening.errback(CannotListenError("127.0.0.1", 8080, OSError(98, "in use")))
    assert reactor.hasStopped


def test_stopping_before_a_listen_completes_cancels_it_quietly():
    reactor = MemoryReactorClock()
    service = listener(reactor)
    service.endpoint = endpoint = LaterEndpoint()
    service.startService()
    stopped = service.stopService()
    assert endpoint.listening.called  # cancelled
    assert successResultOf(stopped) is None
    assert not reactor.hasStopped

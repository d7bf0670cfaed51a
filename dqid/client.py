"""A Python client of dqid's HTTP API (v1), on treq.

Every call returns a Deferred.  The client honours ``Retry-After`` on 429
and 503 answers (sleeping on the reactor's clock, within the bounds of a
:class:`Retry`), and retries a push that got no answer (connection refused
or lost, a timeout, a proxy's 502/504) under an ``Idempotency-Key`` -- its
own uuid4 when none is given -- so a push retried after a lost answer is
queued once.  Errors the server answers as JSON ``{"error", "message"}``
become :class:`DqidError` subclasses; no answer at all, after the retries,
is :class:`Unreachable`.

An ack answered 404 ``unknown_message`` counts as done: the message is not
queued (an earlier try of the same ack, or another worker, removed it), so
:meth:`Client.ack` returns False instead of raising.

Twisted::

    from twisted.internet.defer import Deferred
    from twisted.internet.task import react
    from dqid.client import Client

    async def main(reactor):
        client = Client("http://127.0.0.1:8080", token="s3cret")
        message_id = await client.push(b"resize 42", content_type="text/plain")
        delivery = await client.get(wait=20)
        if delivery is not None:
            print(delivery.id, delivery.body)
            await client.ack(delivery)
        await client.close()

    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))

asyncio (Twisted's asyncio reactor, installed before anything imports
``twisted.internet.reactor``; every Deferred becomes awaitable with
``.asFuture(loop)``)::

    import asyncio
    from twisted.internet import asyncioreactor
    asyncioreactor.install()
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react
    from dqid.client import Client

    async def main():
        loop = asyncio.get_running_loop()
        client = Client("http://127.0.0.1:8080")
        message_id = await client.push(b"resize 42").asFuture(loop)
        delivery = await client.get(wait=20).asFuture(loop)
        ...
        await client.close().asFuture(loop)

    react(lambda reactor: Deferred.fromFuture(asyncio.ensure_future(main())))
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field, replace
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Iterable, Mapping
from urllib.parse import quote

from treq.client import HTTPClient
from twisted.internet import defer, error as net_error
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.client import (
    Agent, HTTPConnectionPool, RequestTransmissionFailed, ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers

log = Logger()

# Nothing reached the server: always safe to send again.
NOT_SENT = (net_error.ConnectError,)
# Sent, but the answer was lost: safe to send again only when a repeat does
# no harm (a push under an Idempotency-Key, a get, an ack...).
UNANSWERED = (
    ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed,
    net_error.ConnectionLost, net_error.ConnectionDone, net_error.TimeoutError,
    defer.TimeoutError,
)
REFUSED = (429, 503)  # the server did nothing: honour Retry-After, try again
GATEWAY = (502, 504)  # a proxy lost the answer: like UNANSWERED


# -- errors ------------------------------------------------------------------


class DqidError(Exception):
    """An answer other than success: HTTP ``status`` and JSON ``code``."""

    def __init__(self, status: int | None, code: str, message: str,
                 retry_after: float | None = None, document: Mapping[str, Any] | None = None
                 ) -> None:
        super().__init__(f"{code}: {message}" if status is None else
                         f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.document: Mapping[str, Any] = document or {}


class BadRequest(DqidError):
    """400: the request was malformed (``bad_request``, ``empty_message``)."""


class Unauthorized(DqidError):
    """401: a bearer token is missing or not accepted."""


class UnknownMessage(DqidError):
    """404 ``unknown_message``: the message is not queued (acked, or never pushed)."""


class Conflict(DqidError):
    """409: the request contradicts the message's state."""


class LeaseLost(Conflict):
    """409 ``lease_lost``: the receipt is not the current lease's (it ran
    out, was nacked, or the message was delivered again)."""


class NotLeased(Conflict):
    """409 ``not_leased``: a touch of a message that is not leased."""


class IdempotencyConflict(Conflict):
    """409 ``idempotency_conflict``: this key was used with another body."""


class MessageTooLarge(DqidError):
    """413 ``message_too_large``."""


class QueueFull(DqidError):
    """429 ``queue_full``, still after the retries."""


class Unavailable(DqidError):
    """503 (``not_replicated``, ``not_ready``) or a proxy's 502/504, still
    after the retries."""


class Unreachable(DqidError):
    """No answer (connection refused or lost, timeout), after the retries;
    ``status`` is None and ``__cause__`` the last transport error."""


_BY_CODE: dict[str, type[DqidError]] = {
    "unknown_message": UnknownMessage, "lease_lost": LeaseLost,
    "not_leased": NotLeased, "idempotency_conflict": IdempotencyConflict,
    "message_too_large": MessageTooLarge, "queue_full": QueueFull,
}
_BY_STATUS: dict[int, type[DqidError]] = {
    400: BadRequest, 401: Unauthorized, 409: Conflict, 413: MessageTooLarge,
    429: QueueFull, 502: Unavailable, 503: Unavailable, 504: Unavailable,
}


# -- values ------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    """One leased message.  ``receipt`` names this lease (None from a
    server that sends no ``Dqid-Receipt``)."""

    id: str
    body: bytes
    receipt: str | None
    deliveries: int
    content_type: str


@dataclass(frozen=True)
class Peeked:
    """A queued message seen by ``GET /messages/ID``: no lease taken."""

    id: str
    body: bytes
    deliveries: int
    state: str
    content_type: str


@dataclass(frozen=True)
class Entry:
    """One message of a batch push, when it needs more than its body."""

    body: bytes | str
    content_type: str | None = None
    delay: float | None = None


@dataclass(frozen=True)
class Retry:
    """Bounds on retrying one call.  ``attempts`` counts the first try;
    no retry starts once ``total`` seconds have passed since it.  A sleep is
    the server's ``Retry-After``, else ``first_delay`` doubling per try;
    never more than ``max_delay``."""

    attempts: int = 10
    total: float = 60.0
    first_delay: float = 0.25
    max_delay: float = 5.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        wanted = retry_after if retry_after is not None else self.first_delay * 2 ** (attempt - 1)
        return max(0.0, min(wanted, self.max_delay))


NO_RETRY = Retry(attempts=1)


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name)
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class _Request:
    """One API call as the retry loop sends it (again)."""

    method: str
    path: str
    expected: tuple[int, ...]  # statuses that are answers, not errors
    params: tuple[tuple[str, str], ...] = ()
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes | None = None
    repeatable: bool = True  # safe to send again after a lost answer
    wait: float = 0.0  # a long poll's wait, added to the timeout

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"


def retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def error_of(answer: _Answer) -> DqidError:
    """The typed error of a non-success answer (JSON or not)."""
    document: Any = None
    try:
        document = answer.json()
    except ValueError:
        pass
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        code = document["error"]
        message = str(document.get("message", ""))
    else:
        document = None
        code = f"http_{answer.status}"
        message = answer.body[:200].decode("utf-8", "replace").strip()
    kind = _BY_CODE.get(code) or _BY_STATUS.get(answer.status, DqidError)
    return kind(answer.status, code, message,
                retry_after_seconds(answer.header("Retry-After")), document)


def _entry_json(entry: bytes | str | Entry, delay: float | None) -> dict[str, Any]:
    if not isinstance(entry, Entry):
        entry = Entry(entry)
    body = entry.body.encode("utf-8") if isinstance(entry.body, str) else entry.body
    document: dict[str, Any]
    try:
        document = {"body": body.decode("utf-8")}
    except UnicodeDecodeError:
        document = {"body": base64.b64encode(body).decode("ascii"), "encoding": "base64"}
    if entry.content_type is not None:
        document["content_type"] = entry.content_type
    chosen = entry.delay if entry.delay is not None else delay
    if chosen is not None:
        document["delay"] = chosen
    return document


def _delivery_of(document: Mapping[str, Any]) -> Delivery:
    text = document["body"]
    body = base64.b64decode(text) if document.get("encoding") == "base64" else text.encode()
    return Delivery(document["id"], body, document.get("receipt"),
                    int(document["deliveries"]), document["content_type"])


def _id_of(delivery_or_id: Delivery | str) -> str:
    return delivery_or_id.id if isinstance(delivery_or_id, Delivery) else delivery_or_id


# -- the client --------------------------------------------------------------


class Client:
    """dqid's HTTP API at ``url`` (e.g. ``http://127.0.0.1:8080``).

    ``http_client`` is for tests (a ``treq.testing.StubTreq`` or any treq
    ``HTTPClient``); by default the client makes its own over a persistent
    connection pool, closed by :meth:`close`.  ``reactor`` times the
    requests (``timeout`` seconds each, beyond a long poll's ``wait``) and
    the sleeps between retries.
    """

    def __init__(self, url: str, *, token: str | None = None, reactor: Any = None,
                 http_client: Any = None, retry: Retry = Retry(), timeout: float = 30.0
                 ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor
            reactor = global_reactor
        self.url = url.rstrip("/")
        self.retry = retry
        self.timeout = timeout
        self._clock: IReactorTime = reactor
        self._token = token
        self._pool: HTTPConnectionPool | None = None
        if http_client is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = 16
            http_client = HTTPClient(Agent(reactor, pool=self._pool))
        self._http = http_client

    def close(self) -> Deferred[None]:
        """Close the pooled connections this client made (not a given http_client's)."""
        if self._pool is None:
            return succeed(None)
        return self._pool.closeCachedConnections()

    # -- operations ----------------------------------------------------------

    def push(self, body: bytes | str, *, content_type: str | None = None,
             key: str | None = None, delay: float | None = None) -> Deferred[str]:
        """Queue one message; its id.  A str body is sent as UTF-8
        (``text/plain; charset=utf-8`` unless ``content_type`` says)."""
        if isinstance(body, str):
            body = body.encode("utf-8")
            content_type = content_type or "text/plain; charset=utf-8"
        headers = {"Idempotency-Key": key or uuid.uuid4().hex}
        if content_type is not None:
            headers["Content-Type"] = content_type
        params = (("delay", _number(delay)),) if delay is not None else ()
        request = _Request("POST", "/push", (200, 201), params, headers, body)
        return self._call(request, lambda answer: answer.json()["id"])

    def push_batch(self, bodies_or_entries: Iterable[bytes | str | Entry], *,
                   delay: float | None = None) -> Deferred[list[str]]:
        """Queue many messages, all or nothing; their ids in order.  Batches
        carry no Idempotency-Key, so only refusals (429, 503) and failed
        connects are retried: after a lost answer the batch may be queued."""
        document = {"messages": [_entry_json(e, delay) for e in bodies_or_entries]}
        body = json.dumps(document).encode("utf-8")
        request = _Request("POST", "/push/batch", (201,), (),
                           {"Content-Type": "application/json"}, body, repeatable=False)
        return self._call(request, lambda answer: list(answer.json()["ids"]))

    def get(self, *, visibility: float | None = None, wait: float | None = None
            ) -> Deferred[Delivery | None]:
        """Lease one message, waiting up to ``wait`` s; None when none came."""
        def delivery(answer: _Answer) -> Delivery | None:
            if answer.status == 204:
                return None
            return Delivery(
                answer.header("Dqid-Id") or "", answer.body, answer.header("Dqid-Receipt"),
                int(answer.header("Dqid-Deliveries") or 1),
                answer.header("Content-Type") or "application/octet-stream",
            )

        request = _Request("GET", "/get", (200, 204), _lease_params(visibility, wait),
                           wait=wait or 0.0)
        return self._call(request, delivery)

    def get_many(self, count: int, *, visibility: float | None = None,
                 wait: float | None = None) -> Deferred[list[Delivery]]:
        """Lease up to ``count`` (1-100) messages; [] when none came."""
        params = (("count", str(count)), *_lease_params(visibility, wait))

        def deliveries(answer: _Answer) -> list[Delivery]:
            if answer.status == 204:
                return []
            return [_delivery_of(m) for m in answer.json()["messages"]]

        return self._call(_Request("GET", "/get", (200, 204), params, wait=wait or 0.0),
                          deliveries)

    def ack(self, delivery_or_id: Delivery | str) -> Deferred[bool]:
        """Remove a message: True, or False when it was not queued any more
        (404: acked already, e.g. by a try whose answer was lost)."""
        path = "/ack/" + quote(_id_of(delivery_or_id), safe="")
        return self._call(_Request("POST", path, (204, 404)), _removed)

    def nack(self, delivery: Delivery, *, delay: float | None = None) -> Deferred[None]:
        """Make the message ready again (after ``delay`` s).  Raises
        LeaseLost when this delivery's lease is over."""
        params = _receipt_params(delivery)
        if delay is not None:
            params += (("delay", _number(delay)),)
        path = "/nack/" + quote(delivery.id, safe="")
        return self._call(_Request("POST", path, (204,), params), _nothing)

    def touch(self, delivery: Delivery, visibility: float) -> Deferred[None]:
        """Extend this delivery's lease to ``visibility`` s from now."""
        params = (("visibility", _number(visibility)), *_receipt_params(delivery))
        path = "/touch/" + quote(delivery.id, safe="")
        return self._call(_Request("POST", path, (204,), params), _nothing)

    def peek(self, message_id: str) -> Deferred[Peeked | None]:
        """A queued message without leasing it; None when it is not queued."""
        def peeked(answer: _Answer) -> Peeked | None:
            if answer.status == 404:
                error = error_of(answer)
                if error.code != "unknown_message":
                    raise error
                return None
            return Peeked(
                answer.header("Dqid-Id") or message_id, answer.body,
                int(answer.header("Dqid-Deliveries") or 0), answer.header("Dqid-State") or "",
                answer.header("Content-Type") or "application/octet-stream",
            )

        path = "/messages/" + quote(message_id, safe="")
        return self._call(_Request("GET", path, (200, 404)), peeked)

    def stats(self) -> Deferred[dict[str, Any]]:
        """This node's ``/stats`` document."""
        return self._call(_Request("GET", "/stats", (200,)), lambda answer: answer.json())

    # -- one call, with its retries -------------------------------------------

    def _call(self, request: _Request, decode: Callable[[_Answer], Any]) -> Deferred[Any]:
        if self._token is not None:
            request = replace(request, headers={
                **request.headers, "Authorization": f"Bearer {self._token}"})
        return Deferred.fromCoroutine(self._attempts(request, decode))

    async def _attempts(self, request: _Request, decode: Callable[[_Answer], Any]) -> Any:
        started = self._clock.seconds()
        attempt = 0
        while True:
            attempt += 1
            retry_after: float | None = None
            try:
                answer = await self._exchange(request)
            except CancelledError:
                raise
            except NOT_SENT + UNANSWERED as problem:
                failure: DqidError = Unreachable(None, "unreachable", repr(problem))
                failure.__cause__ = problem
                if not request.repeatable and not isinstance(problem, NOT_SENT):
                    raise failure
            else:
                if answer.status in request.expected:
                    return decode(answer)
                failure = error_of(answer)
                if answer.status not in REFUSED and not (
                        request.repeatable and answer.status in GATEWAY):
                    raise failure
                retry_after = failure.retry_after
            pause = self.retry.delay(attempt, retry_after)
            spent = self._clock.seconds() - started
            if attempt >= self.retry.attempts or spent + pause > self.retry.total:
                raise failure
            log.info("dqid {request}: {problem}; try {attempt} in {pause}s",
                     request=request.name, path=request.path, problem=str(failure),
                     attempt=attempt + 1, pause=pause)
            await deferLater(self._clock, pause)

    async def _exchange(self, request: _Request) -> _Answer:
        """One request and its whole answer, within ``timeout`` s (plus a
        long poll's wait).

        The Agent reports a cancelled request as ResponseNeverReceived or
        ResponseFailed around a CancelledError: a timeout becomes
        TimeoutError (retried), a cancel by the caller CancelledError."""
        async def exchange() -> _Answer:
            response = await self._http.request(
                request.method, self.url + request.path, params=list(request.params),
                headers=dict(request.headers), data=request.body)
            content = await response.content()
            return _Answer(response.code, response.headers, content)

        running = Deferred.fromCoroutine(exchange())
        timed_out: list[bool] = []

        def time_out() -> None:
            timed_out.append(True)
            running.cancel()

        limit = self.timeout + request.wait
        timer = self._clock.callLater(limit, time_out)
        try:
            return await running
        except Exception as problem:
            if timed_out:
                raise defer.TimeoutError(limit, request.name) from problem
            if isinstance(problem, CancelledError) or any(
                    reason.check(CancelledError) for reason in getattr(problem, "reasons", ())):
                raise CancelledError() from problem
            raise
        finally:
            if timer.active():
                timer.cancel()


def _number(value: float) -> str:
    """Seconds for a query: ``20`` rather than ``20.0``, else every digit."""
    number = float(value)
    return str(int(number)) if number.is_integer() else repr(number)


def _lease_params(visibility: float | None, wait: float | None) -> tuple[tuple[str, str], ...]:
    params: tuple[tuple[str, str], ...] = ()
    if visibility is not None:
        params += (("visibility", _number(visibility)),)
    if wait is not None:
        params += (("wait", _number(wait)),)
    return params


def _receipt_params(delivery: Delivery) -> tuple[tuple[str, str], ...]:
    # A server from before receipts sends none and wants none.
    return (("receipt", delivery.receipt),) if delivery.receipt is not None else ()


def _nothing(answer: _Answer) -> None:
    return None


def _removed(answer: _Answer) -> bool:
    """An ack's answer: 204 removed it; 404 ``unknown_message`` means it was
    not queued (done already); any other 404 is an error."""
    if answer.status == 204:
        return True
    error = error_of(answer)
    if isinstance(error, UnknownMessage):
        return False
    raise error

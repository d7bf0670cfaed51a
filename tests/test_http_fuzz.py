"""Raw, mutated HTTP/1.1 requests over a real socket to a real node.

DESIGN.md, Security: "Fuzzed HTTP requests never give a 500 or a stuck
connection."  One standalone ``twistd -n dqid`` process per variant (open,
and guarded by ``--http-token-file`` so the 401 path is fuzzed too) gets
requests built from a corpus of valid requests to every route, framed in
many ways (true and lying Content-Lengths, good and bad chunked bodies,
duplicate headers, no Host, HTTP/1.0, huge header lines, pipelining) and
then mutated byte by byte.  For each one: every response status in what
comes back is below 500, the server closes the connection within
``CLOSE_TIMEOUT`` seconds of our half-close, the process lives, and its log
gains no traceback.  After the run ``/health`` still answers 200.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from .procs import DqidProcess

pytestmark = pytest.mark.process

MAX_MESSAGE_BYTES = 4096
TOKEN = "fuzz-token-1"
EXAMPLES = 300  # per property and variant; ten times as many with --soak
CLOSE_TIMEOUT = 5.0  # seconds the server has to close after our half-close
# How long we wait for a first answer, and then for more after each piece,
# before we half-close.  twisted.web's HTTPChannel is not half-closeable: an
# end of input it reads before its answers are flushed drops them.
FIRST_ANSWER_WAIT = 0.1
QUIET_GAP = 0.02

# What a traceback or an unhandled failure leaves in a twistd log.
BAD_LOG_LINE = re.compile(r"traceback|unhandled error", re.IGNORECASE)
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3})[^\r\n]*\r\n")


# -- talking to a server --------------------------------------------------------


@dataclass
class Exchange:
    """What came back for one write, and whether the server closed in time."""

    received: bytes
    closed: bool


def _read(sock: socket.socket, received: bytearray, wait: float, gap: float | None) -> bool:
    """Read into ``received`` for up to ``wait`` seconds (with ``gap``: and
    no longer than ``gap`` seconds after each piece); True if the server
    closed the connection."""
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        if not chunk:
            return True
        received += chunk
        if gap is not None:
            deadline = time.monotonic() + gap
    return False


def exchange(port: int, data: bytes, close_timeout: float = CLOSE_TIMEOUT,
             first_answer_wait: float = FIRST_ANSWER_WAIT,
             quiet_gap: float = QUIET_GAP) -> Exchange:
    """Send ``data`` in one write on a new connection, read the answers,
    half-close, and read until the server closes (or ``close_timeout``)."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=close_timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:  # it closed on us part way (a 400 and close): read what it said
            pass
        if _read(sock, received, first_answer_wait, quiet_gap):
            return Exchange(bytes(received), closed=True)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        closed = _read(sock, received, close_timeout, None)
    return Exchange(bytes(received), closed)


def _body_end(received: bytes, status: int, head: bytes, start: int) -> int:
    """Where the body that starts at ``start`` ends, by its framing."""
    if 100 <= status < 200 or status in (204, 304):
        return start
    if received.startswith(b"HTTP/1.", start):  # an answer to HEAD: no body
        return start
    fields = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        fields[name.strip().lower()] = value.strip()
    if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
        at = start
        while True:
            line_end = received.find(b"\r\n", at)
            if line_end < 0:
                return len(received)
            try:
                size = int(received[at:line_end].split(b";")[0], 16)
            except ValueError:
                return start
            at = line_end + 2 + size + 2
            if size == 0:
                trailer_end = received.find(b"\r\n\r\n", line_end)
                return len(received) if trailer_end < 0 else trailer_end + 4
    length = fields.get(b"content-length", b"")
    return start + int(length) if length.isdigit() else start


def response_statuses(received: bytes) -> list[int]:
    """The status of every response in ``received``, in order.  Each body
    is skipped by its framing, so a delivered message that happens to hold
    text like a status line is not read as one."""
    statuses: list[int] = []
    at = 0
    while (match := STATUS_LINE.search(received, at)) is not None:
        status = int(match.group(1))
        statuses.append(status)
        head_end = received.find(b"\r\n\r\n", match.start())
        if head_end < 0:
            break
        at = max(_body_end(received, status, received[match.start():head_end], head_end + 4),
                 head_end + 4)
    return statuses


def log_entries(text: str) -> list[str]:
    """A twistd log's entries: each line with the tab-indented lines
    (a traceback) that follow it."""
    entries: list[str] = []
    for line in text.splitlines(keepends=True):
        if line.startswith("\t") and entries:
            entries[-1] += line
        else:
            entries.append(line)
    return entries


def asks_for_long_poll(data: bytes) -> bool:
    """True if any ``wait=`` in ``data`` would be a long poll (0 < S <= 20):
    one that outlasts the close timeout is not a stuck connection."""
    text = urllib.parse.unquote_to_bytes(data)
    for match in re.finditer(rb"wait=([^& \r\n]*)", text):
        try:
            seconds = float(match.group(1).replace(b"+", b" ").decode("latin-1"))
        except ValueError:
            continue
        if 0 < seconds <= 20:
            return True
    return False


# -- the node --------------------------------------------------------------------


@dataclass
class FuzzTarget:
    """A running node, the token it wants (None: open) and ids it queued."""

    node: DqidProcess
    token: str | None
    message_ids: list[str]
    log_read: int = 0  # bytes of the log already checked
    statuses_seen: set[int] = field(default_factory=set)

    def new_log(self) -> str:
        """The whole lines the node logged since the last call."""
        with open(self.node.log_path, "rb") as log:
            log.seek(self.log_read)
            text = log.read()
        text = text[:text.rfind(b"\n") + 1]
        self.log_read += len(text)
        return text.decode("utf-8", "replace")

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


@pytest.fixture(scope="module", params=["open", "tokens"])
def target(request, tmp_path_factory) -> Iterator[FuzzTarget]:
    workdir: Path = tmp_path_factory.mktemp(f"http-fuzz-{request.param}")
    args = [f"--max-message-bytes={MAX_MESSAGE_BYTES}", "--size=100000"]
    token = None
    if request.param == "tokens":
        token = TOKEN
        (workdir / "tokens").write_text(f"# fuzz\n{token}\n")
        args.append(f"--http-token-file={workdir / 'tokens'}")
    node = DqidProcess(workdir, "fuzz", args)
    try:
        node.start()
        node.wait_for("/ready")
        found = FuzzTarget(node, token, [])
        for number in range(20):
            pushed = node.http("POST", "/push", b"job %d" % number, found.auth())
            assert pushed.status == 201, pushed
            found.message_ids.append(pushed.json()["id"])
        yield found
    finally:
        node.kill()


def check_one(target: FuzzTarget, data: bytes) -> None:
    """The promise for one write: answered below 500, closed in time, the
    node alive and its log clean."""
    result = exchange(target.node.http_port, data)
    assert result.closed, (
        f"the node did not close the connection within {CLOSE_TIMEOUT}s of our "
        f"half-close; it sent {result.received[:300]!r}")
    statuses = response_statuses(result.received)
    target.statuses_seen.update(statuses)
    assert all(status < 500 for status in statuses), (statuses, result.received[:2000])
    assert target.node.alive(), target.node.log_tail()
    bad = [entry for entry in log_entries(target.new_log()) if BAD_LOG_LINE.search(entry)]
    assert not bad, "".join(bad)


def fuzz_settings(request, examples: int = EXAMPLES) -> settings:
    soak = request.config.getoption("--soak")
    return settings(
        max_examples=examples * (10 if soak else 1), deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.large_base_example,
                               HealthCheck.filter_too_much],
    )


# -- the corpus: valid requests to every route -------------------------------------


@dataclass(frozen=True)
class Request:
    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""


def _query(pairs: list[tuple[str, str]]) -> str:
    return ("?" + "&".join(f"{name}={value}" for name, value in pairs)) if pairs else ""


# Query values: good, out of range, not numbers, escaped, not ASCII.
numbers = st.sampled_from([
    "1", "0.5", "30", "43200", "43201", "0", "-1", "1e3", "1e999", "nan", "inf", "-inf",
    "abc", "", "%31", "%ff", "\u00e9", "0x10", "1_0", " 5", "+5",
])
# wait=S only as values that never make a long poll.
waits = st.sampled_from(["0", "0.0", "-0", "00", "21", "-1", "nan", "inf", "abc", "", "%ff",
                         "1e9"])
counts = st.sampled_from(["1", "2", "100", "101", "0", "-1", "1.5", "abc", "", "%32", "\u0663"])
content_types = st.one_of(
    st.sampled_from([b"text/plain", b"application/json", b"application/octet-stream",
                     b"multipart/form-data; boundary=x", b"application/x-www-form-urlencoded",
                     b"text/plain; charset=utf-8", b"", b"\xff\xfe", b"a" * 300]),
    st.binary(max_size=20).filter(lambda raw: b"\r" not in raw and b"\n" not in raw),
)
idempotency_keys = st.one_of(
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=20)
    .map(str.encode),
    st.sampled_from([b"", b" ", b"k" * 255, b"k" * 256, b"\xff", b"key\x7f", b"\xc3\xa9"]),
)
bodies = st.one_of(
    st.binary(max_size=64),
    st.binary(min_size=MAX_MESSAGE_BYTES - 2, max_size=MAX_MESSAGE_BYTES + 2),
    st.sampled_from([b"", b"job", b"\x00" * 10, "\u00e9t\u00e9".encode()]),
)


@st.composite
def message_ids(draw, known: list[str]) -> str:
    """An id for a path: one the node queued, one it never made, or junk."""
    return draw(st.one_of(
        st.sampled_from(known),
        st.sampled_from([
            "fuzz.1.1", "fuzz.zzzzzzzzzzzzz.1", "other.1.1", "x", "%ff", "%", "%zz", "%2F",
            "%2e%2e", "..", ".", "a%00b", "\u00e9", "%C3%A9", "fuzz.1.1%20", "a" * 3000,
            "fuzz.01.1", "fuzz.-1.1",
        ]),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                              exclude_characters="/?#"), min_size=1, max_size=30),
    ))


@st.composite
def push_requests(draw) -> Request:
    headers = []
    if draw(st.booleans()):
        headers.append((b"Content-Type", draw(content_types)))
    if draw(st.booleans()):
        headers.append((b"Idempotency-Key", draw(idempotency_keys)))
    query = _query(draw(st.lists(st.tuples(st.just("delay"), numbers), max_size=1)))
    return Request(b"POST", f"/push{query}".encode(), tuple(headers), draw(bodies))


batch_entries = st.fixed_dictionaries(
    {"body": st.one_of(st.text(max_size=20),
                       st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
                       st.sampled_from(["", "!!notbase64", "x" * (MAX_MESSAGE_BYTES + 1)]),
                       st.integers())},
    optional={
        "encoding": st.sampled_from(["base64", "utf-8", "", None, 1]),
        "content_type": st.one_of(st.text(max_size=10), st.sampled_from(["text/plain", 5])),
        "delay": st.one_of(st.integers(-1, 5), st.just("x")),
    },
)
batch_documents = st.one_of(
    st.builds(lambda entries: {"messages": entries}, st.lists(batch_entries, max_size=4)),
    st.sampled_from([{}, {"messages": None}, {"messages": "x"}, [], None, 5, "x",
                     {"messages": [{"body": "x"}] * 1001}]),
)
raw_json_junk = st.sampled_from([
    b"", b"{", b"[]", b"null", b"\xff\xfe", b"[" * 5000 + b"]" * 5000,
    b'{"messages": [' + b"[" * 5000 + b"]" * 5000 + b"]}", b'{"ids": 1e999}',
    b'{"ids": ["a", 1]}', '{"ids": ["\u00e9"]}'.encode(), b'{"ids": ["\\ud800"]}',
])


def batch_requests() -> st.SearchStrategy[Request]:
    return st.builds(
        lambda body: Request(b"POST", b"/push/batch",
                             ((b"Content-Type", b"application/json"),), body),
        st.one_of(batch_documents.map(lambda doc: json.dumps(doc).encode()), raw_json_junk),
    )


def ack_batch_requests(known: list[str]) -> st.SearchStrategy[Request]:
    ids = st.lists(st.one_of(st.sampled_from(known), st.text(max_size=10), st.integers()),
                   max_size=5)
    documents = st.one_of(ids.map(lambda i: {"ids": i}),
                          st.sampled_from([{}, {"ids": None}, {"ids": "x"}, [],
                                           {"ids": ["x"] * 1001}]))
    return st.builds(
        lambda body: Request(b"POST", b"/ack", ((b"Content-Type", b"application/json"),), body),
        st.one_of(documents.map(lambda doc: json.dumps(doc).encode()), raw_json_junk),
    )


def get_requests() -> st.SearchStrategy[Request]:
    params = st.lists(st.one_of(st.tuples(st.just("visibility"), numbers),
                                st.tuples(st.just("wait"), waits),
                                st.tuples(st.just("count"), counts),
                                st.tuples(st.sampled_from(["x", "", "v%69sibility"]), numbers)),
                      max_size=3)
    return st.builds(lambda method, pairs: Request(method, f"/get{_query(pairs)}".encode()),
                     st.sampled_from([b"GET", b"POST"]), params)


def lease_requests(known: list[str]) -> st.SearchStrategy[Request]:
    """POST /ack/ID, /nack/ID, /touch/ID (and /kick/ID, /messages/ID) with
    query values."""
    params = st.lists(st.one_of(st.tuples(st.sampled_from(["visibility", "delay"]), numbers),
                                st.tuples(st.just("receipt"),
                                          st.sampled_from(["r", "", "%ff", "x" * 300]))),
                      max_size=3)
    return st.builds(
        lambda verb, message_id, pairs: Request(
            b"POST", f"/{verb}/{message_id}{_query(pairs)}".encode("utf-8", "surrogatepass")),
        st.sampled_from(["ack", "nack", "touch", "kick", "messages"]),
        message_ids(known), params,
    )


def other_requests() -> st.SearchStrategy[Request]:
    """Introspection, unknown paths, odd methods and odd targets."""
    return st.builds(
        Request,
        st.sampled_from([b"GET", b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH",
                         b"OPTIONS", b"TRACE", b"CONNECT", b"get", b"FOO", b"G\xffT"]),
        st.sampled_from([
            b"/stats", b"/health", b"/ready", b"/metrics", b"/cluster", b"/openapi.json",
            b"/held?count=5", b"/held?count=-1", b"/", b"/nowhere", b"/push/", b"//push",
            b"/ack/", b"/ack/a/b", b"/ack/%ff", b"/ack/\xff", b"/%", b"/%00", b"*",
            b"http://127.0.0.1/health", b"/health?x=%ff", b"/stats#frag",
            b"/../../etc/passwd", b"/" + b"a" * 8000,
        ]),
    )


def corpus(known: list[str]) -> st.SearchStrategy[Request]:
    return st.one_of(push_requests(), batch_requests(), get_requests(),
                     lease_requests(known), ack_batch_requests(known), other_requests())


# -- framing: how a request becomes bytes ----------------------------------------------

BAD_CHUNK_SIZES = [b"zz", b"-1", b"", b"ffffffffffffffffffffffff", b"0x10", b" 5", b"5 ",
                   b"1;", b"\xff", b"+1", b"1 1"]
BAD_LENGTHS = [b"abc", b"-1", b"+5", b"0x10", b" 5 ", b"99999999999999999999999", b"1e3",
               b"\xff", b"", b"5, 6", b"0" * 50]


def _chunked(draw, body: bytes, bad: bool) -> bytes:
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)]) if b > a]
    lines = []
    for piece in pieces:
        size = b"%x" % len(piece)
        size = draw(st.sampled_from([size, size.upper(), b"00" + size, size + b";ext=1"]))
        lines.append(size + b"\r\n" + piece + b"\r\n")
    lines.append(b"0\r\n" + draw(st.sampled_from([b"", b"X-Trailer: 1\r\n"])) + b"\r\n")
    if bad:
        at = draw(st.integers(0, len(lines) - 1))
        spoil = draw(st.sampled_from(["size", "lie", "cut", "no_crlf"]))
        if spoil == "size":
            lines[at] = draw(st.sampled_from(BAD_CHUNK_SIZES)) + b"\r\n" + lines[at].split(
                b"\r\n", 1)[1]
        elif spoil == "lie":
            lines[at] = b"%x\r\n" % draw(st.integers(1, 70000)) + lines[at].split(b"\r\n", 1)[1]
        elif spoil == "cut":
            lines = lines[:at]
        else:
            lines[at] = lines[at][:-2]
    return b"".join(lines)


def framed(request: Request, odd: bool) -> st.SearchStrategy[tuple[list, bytes]]:
    """Headers that frame the body, and the bytes sent after the headers:
    a true Content-Length, or (``odd``) some other framing."""
    body = request.body
    if not odd:
        return st.just(([(b"Content-Length", b"%d" % len(body))] if body else [], body))
    return _odd_framing(body)


@st.composite
def _odd_framing(draw, body: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    how = draw(st.sampled_from([
        "none", "short", "long", "chunked", "bad_chunked", "length_and_chunked",
        "two_lengths", "junk_length", "other_encoding"]))
    if how == "none":
        return [], body
    if how == "short":
        return [(b"Content-Length", b"%d" % draw(st.integers(0, max(len(body) - 1, 0))))], body
    if how == "long":  # the server waits for the rest: our half-close ends it
        return [(b"Content-Length", b"%d" % (len(body) + draw(st.integers(1, 10**6))))], body
    if how in ("chunked", "bad_chunked"):
        return [(b"Transfer-Encoding", b"chunked")], _chunked(draw, body, how == "bad_chunked")
    if how == "length_and_chunked":
        return ([(b"Content-Length", b"%d" % len(body)), (b"Transfer-Encoding", b"chunked")],
                _chunked(draw, body, False))
    if how == "two_lengths":
        other = draw(st.sampled_from([len(body), len(body) + 1, 0]))
        return [(b"Content-Length", b"%d" % len(body)), (b"Content-Length", b"%d" % other)], body
    if how == "junk_length":
        return [(b"Content-Length", draw(st.sampled_from(BAD_LENGTHS)))], body
    encoding = draw(st.sampled_from([b"gzip", b"chunked, gzip", b"gzip, chunked", b"identity",
                                     b"CHUNKED", b"\xff"]))
    return [(b"Transfer-Encoding", encoding)], body


def authorizations(token: str | None, odd: bool) -> st.SearchStrategy[list]:
    """The token's header (none for an open node), or (``odd``) wrong,
    missing, malformed or duplicated ones."""
    good = [] if token is None else [(b"Authorization", b"Bearer " + token.encode())]
    if not odd:
        return st.just(good)
    return st.sampled_from([
        [], [(b"Authorization", b"Bearer wrong")], [(b"Authorization", b"Bearer")],
        [(b"Authorization", b"Basic dG9rZW46")], [(b"Authorization", b"Bearer \xff\xfe")],
        [(b"Authorization", b"Bearer " + b"t" * 5000)],
        [(b"Authorization", b"bearer  " + (token or "x").encode())],
        [*good, (b"Authorization", b"Bearer wrong")],
        [(b"Authorization", b"Bearer wrong"), *good],
    ])


extra_headers = st.sampled_from([
    (b"Connection", b"close"), (b"Connection", b"keep-alive"), (b"Connection", b"Upgrade"),
    (b"Expect", b"100-continue"), (b"Expect", b"nonsense"), (b"Content-Type", b"text/plain"),
    (b"Idempotency-Key", b"dup"), (b"X-Bytes", b"\x00\xff\x80"), (b"X-Empty", b""),
    (b"X-Folded", b"a\r\n b"), (b"No Colon Here", b""), (b" Leading-Space", b"x"),
    (b"X-Colon", b": :"), (b"Host", b"second.example"), (b"Accept-Encoding", b"gzip"),
    (b"Cookie", b"a=%ff"), (b"Content-Length", b"0"),
])
ODD_VERSIONS = [b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1", b"HTTP/1", b"HTTP/1.1 x",
                b""]
ODD_HOSTS = [[], [(b"Host", b"")], [(b"Host", b"\xff")], [(b"Host", b"a"), (b"Host", b"b")]]
# What may be odd about one request; each request has a few of them.
ASPECTS = ["version", "host", "auth", "framing", "extras", "huge", "many", "newline"]


@st.composite
def serialized(draw, request: Request, token: str | None) -> bytes:
    """One request as bytes: request line, headers in any order, body;
    sound but for up to three odd aspects (so that many reach the API)."""
    odd = draw(st.sets(st.sampled_from(ASPECTS), max_size=3))
    version = draw(st.sampled_from(ODD_VERSIONS)) if "version" in odd else b"HTTP/1.1"
    line = b" ".join(part for part in (request.method, request.target, version) if part)
    headers = list(request.headers)
    headers += draw(st.sampled_from(ODD_HOSTS)) if "host" in odd else [(b"Host", b"127.0.0.1")]
    headers += draw(authorizations(token, "auth" in odd))
    frame_headers, payload = draw(framed(request, "framing" in odd))
    headers += frame_headers
    if "extras" in odd:
        headers += draw(st.lists(extra_headers, min_size=1, max_size=3))
    if "huge" in odd:  # a huge header line
        headers.append((b"X-Huge", b"h" * draw(st.sampled_from([1000, 8000, 17000, 70000]))))
    headers = draw(st.permutations(headers))
    if "many" in odd:  # up to more headers than twisted.web takes
        headers += [(b"X-Many-%d" % number, b"1") for number in range(draw(st.integers(1, 510)))]
    newline = b"\n" if "newline" in odd else b"\r\n"
    head = newline.join([line, *(name + b": " + value for name, value in headers)])
    return head + newline + newline + payload


# -- mutations ---------------------------------------------------------------------------

INSERTS = st.one_of(
    st.binary(min_size=1, max_size=8),
    st.sampled_from([b"\r\n", b"\n", b"\r", b"\x00", b"%ff", b"%", b" ", b":", b"\r\n\r\n",
                     b"?", b"&", b"=", b"/", b"\xff\xfe", b"%00", b"Content-Length: 7\r\n",
                     b"Transfer-Encoding: chunked\r\n", b"\r\n0\r\n\r\n", b";", b"\t"]),
)


@st.composite
def mutated(draw, data: bytes) -> bytes:
    """``data`` as it is, or with up to four flips, inserts, deletes, duplications
    or cuts."""
    buffer = bytearray(data)
    for _ in range(draw(st.one_of(st.just(0), st.integers(1, 4)))):
        at = draw(st.integers(0, len(buffer)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "duplicate", "truncate"]))
        if op == "flip" and at < len(buffer):
            buffer[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            buffer[at:at] = draw(INSERTS)
        elif op == "delete":
            del buffer[at:at + draw(st.integers(1, 16))]
        elif op == "duplicate":
            buffer[at:at] = buffer[at:at + draw(st.integers(1, 64))]
        elif op == "truncate":
            del buffer[at:]
    return bytes(buffer)


def raw_requests(known: list[str], token: str | None) -> st.SearchStrategy[bytes]:
    """One to three requests from the corpus in one write, then mutated."""
    one = corpus(known).flatmap(lambda request: serialized(request, token))
    return st.lists(one, min_size=1, max_size=3).map(b"".join).flatmap(mutated)


# Cases issue 9 names, always run first.
NAMED_CASES = [
    b"POST /ack/%ff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /push HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nshort",
    b"POST /push HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nlonger than one byte",
    b"POST /push HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    b"POST /push HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"ffffffffffffffffffff\r\nab\r\n0\r\n\r\n",
    b"GET /stats HTTP/1.1\r\nHost: x\r\nX-Huge: " + b"h" * 70000 + b"\r\n\r\n",
    b"GET /health HTTP/1.1\r\n\r\n",
    b"GET /health HTTP/1.0\r\n\r\n",
    b"GET /health\r\n\r\n",
    b"POST /push HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
    b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nPOST /push HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 3\r\n\r\nabcGET /get?wait=0 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /push/batch HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n" + b"[" * 10000,
]


# -- the properties ----------------------------------------------------------------------


def test_mutated_requests_never_get_a_500_nor_hang(target: FuzzTarget, request) -> None:
    @fuzz_settings(request)
    @given(data=raw_requests(target.message_ids, target.token))
    def property_(data: bytes) -> None:
        assume(not asks_for_long_poll(data))
        check_one(target, data)

    for case in NAMED_CASES:
        property_ = example(data=case)(property_)
    property_()
    assert target.node.http("GET", "/health").status == 200
    # The run reached the API, not only twisted.web's 400s.
    assert target.statuses_seen & {200, 201, 204}, target.statuses_seen


@st.composite
def spliced_requests(draw, known: list[str], token: str | None) -> bytes:
    """Requests from the corpus cut and spliced: a first one, then the head
    of a second glued to the tail of a third."""
    one = corpus(known).flatmap(lambda request: serialized(request, token))
    first, second, third = draw(one), draw(one), draw(one)
    cut = draw(st.integers(0, len(second)))
    glue = draw(st.integers(0, len(third)))
    return first + second[:cut] + third[glue:]


def test_spliced_requests_never_get_a_500_nor_hang(target: FuzzTarget, request) -> None:
    @fuzz_settings(request, examples=EXAMPLES // 2)
    @given(data=spliced_requests(target.message_ids, target.token))
    def property_(data: bytes) -> None:
        assume(not asks_for_long_poll(data))
        check_one(target, data)

    property_()
    assert target.node.http("GET", "/health").status == 200


# -- the harness can fail ------------------------------------------------------------------


def _auth_lines(target: FuzzTarget) -> bytes:
    return b"".join(b"%s: %s\r\n" % (name.encode(), value.encode())
                    for name, value in target.auth().items())


def _answers(target: FuzzTarget, data: bytes) -> list[int]:
    """The statuses of the answers to ``data``, which ends with a request
    that asks the node to close (so no waiting on a quiet gap)."""
    result = exchange(target.node.http_port, data, first_answer_wait=CLOSE_TIMEOUT,
                      quiet_gap=CLOSE_TIMEOUT)
    assert result.closed
    return response_statuses(result.received)


def test_pipelined_valid_requests_each_get_their_answer(target: FuzzTarget) -> None:
    auth = _auth_lines(target)
    push = b"POST /push HTTP/1.1\r\nHost: x\r\n%sContent-Length: 3\r\n\r\nabc" % auth
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    stats = b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s\r\n" % auth
    assert _answers(target, push + health + stats) == [201, 200, 200]
    if target.token:
        assert _answers(target, b"GET /stats HTTP/1.1\r\nConnection: close\r\n\r\n") == [401]


def test_a_connection_the_server_never_closes_is_reported() -> None:
    with socket.socket() as silent:  # accepts (in the kernel) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        result = exchange(silent.getsockname()[1], b"GET /health HTTP/1.1\r\n\r\n",
                          close_timeout=0.3)
    assert not result.closed


def test_statuses_are_read_by_framing() -> None:
    echoed = b"x HTTP/1.1 500 Oops\r\n"
    received = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(echoed), echoed)
        + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%s\r\n0\r\n\r\n" % (len(echoed), echoed)
        + b"HTTP/1.1 204 No Content\r\n\r\n"
        + b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n"  # an answer to HEAD
        + b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert response_statuses(received) == [100, 200, 200, 204, 200, 500]


OTHER_ENTRY = (
    "2026-11-30T13:29:17+0000 [dqid.web.HttpApi#critical] unhandled error in POST /push\n"
    "\tTraceback (most recent call last):\n"
    "\tbuiltins.UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 1\n"
    "\t\n"
)


def test_log_entries_with_a_traceback_are_found() -> None:
    info = "2026-11-30T13:29:18+0000 [-] QuietSite starting on 8080\n"
    entries = log_entries(info + OTHER_ENTRY + info)
    assert entries == [info, OTHER_ENTRY, info]
    assert [bool(BAD_LOG_LINE.search(e)) for e in entries] == [False, True, False]


@pytest.mark.parametrize("query, long_poll", [
    (b"/get?wait=0", False), (b"/get?wait=21", False), (b"/get?wait=abc", False),
    (b"/get?wait=1", True), (b"/get?wait=%31", True), (b"/get?wait=+2", True),
    (b"/get?x=1&wait=0.5", True),
])
def test_long_polls_are_left_out(query: bytes, long_poll: bool) -> None:
    assert asks_for_long_poll(b"GET " + query + b" HTTP/1.1\r\n\r\n") is long_poll


# -- URLs that are not UTF-8 ---------------------------------------------------------------------------


@pytest.mark.parametrize("head", [
    b"POST /ack/%ff HTTP/1.1\r\nHost: x\r\n",
    b"GET /nowhere HTTP/1.1\r\nHost: \xff\r\n",
], ids=["path", "host"])
def test_a_non_utf8_url_leaves_no_traceback_in_the_log(target: FuzzTarget, head: bytes) -> None:
    target.new_log()
    request = head + b"Connection: close\r\n" + _auth_lines(target) + b"\r\n"
    assert _answers(target, request) == [400]
    assert "Traceback" not in target.new_log()  # a JSON 400, nothing logged

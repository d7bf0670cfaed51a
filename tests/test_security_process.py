"""Peer security with real ``twistd dqid`` processes on 127.0.0.1 (DESIGN.md, "Security").

* ``--peer`` without ``--cluster-key-file`` is a one-line error, exit 2;
* an impostor process with a member's id and the wrong key never becomes a
  member, and the cluster keeps replicating;
* the outsider script of issue 9, over a plain socket that speaks AMP but
  knows no key, is refused at every step and changes nothing;
* with ``--peer-tls-cert/-key/-ca`` a 3-node cluster links and replicates
  over mutual TLS; a node with a certificate from a foreign CA (and the
  right key) is refused, and a plain-TCP client gets no AMP answer.

Every process is killed by its PID (the ``pool`` fixture); every wait is
bounded.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.protocols import amp

from dqid import amp_commands as cmd
from dqid.auth_commands import AuthChallenge, AuthProve
from dqid.handshake import DIALLER, DiallerHandshake, make_proof
from dqid.ids import format_id, parse_id
from dqid.keyfile import load_cluster_key
from dqid.replica import Record
from dqid.tombstones import Tombstones
from dqid.wire import MAX_EPOCH, encode_records, encode_states, encode_tombstones

from .cluster import LocalCluster
from .procs import DqidProcess, cluster_key_file, free_port, run_dqid
from .tls_certs import make_pki

pytestmark = pytest.mark.process

SOCKET_TIMEOUT = 5.0  # a node that neither answers nor hangs up fails the test
SETTLE = 3.0  # seconds an impostor gets to try (and fail) to join


# -- a plain-socket AMP client ---------------------------------------------------


class RawAmp:
    """AMP over a blocking socket, no reactor: what an outsider's script is."""

    def __init__(self, port: int, timeout: float = SOCKET_TIMEOUT,
                 tls: ssl.SSLContext | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.address = "%s:%d" % self.sock.getsockname()
        if tls is not None:
            self.sock = tls.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.buffer = b""
        self.asked = 0
        self.closed = False
        self.error: OSError | None = None  # how the node hung up, if not cleanly

    def send(self, command: type[amp.Command], **arguments: Any) -> None:
        """One box; asked for an answer unless the command takes none
        (Stream, Copied)."""
        box = command.makeArguments(arguments, None)
        box[b"_command"] = command.commandName
        if command.requiresAnswer:
            self.asked += 1
            box[b"_ask"] = b"%d" % self.asked
        self.send_bytes(box.serialize())

    def send_bytes(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:  # the node hung up already
            self.closed = True

    def _read(self, count: int) -> bytes | None:
        while len(self.buffer) < count:
            try:
                data = self.sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError) as error:  # TLS: with an alert
                self.error = error
                data = b""
            if not data:
                self.closed = True
                return None
            self.buffer += data
        taken, self.buffer = self.buffer[:count], self.buffer[count:]
        return taken

    def read_box(self) -> dict[bytes, bytes] | None:
        """The next box, or None when the node hung up first (a socket
        timeout fails the test: the node neither answered nor hung up)."""
        box: dict[bytes, bytes] = {}
        while True:
            raw = self._read(2)
            if raw is None:
                return None
            (length,) = struct.unpack(">H", raw)
            if length == 0:
                return box
            key = self._read(length)
            raw = self._read(2)
            value = self._read(struct.unpack(">H", raw)[0]) if raw else None
            if key is None or value is None:
                return None
            box[key] = value

    def call(self, command: type[amp.Command], **arguments: Any) -> dict[bytes, bytes] | None:
        """Send ``command`` and read the next box: its answer, or None when
        the node hung up (for an unanswered command, only a hang-up ends
        the wait)."""
        self.send(command, **arguments)
        return self.read_box()

    def hung_up(self) -> bool:
        """True once the node closed the connection (within the timeout)."""
        return self.read_box() is None and self.closed

    def rest(self) -> bytes:
        """Every byte until the node hangs up (within the timeout)."""
        data = b""
        while not self.closed:
            data += self.buffer + (self._read(1) or b"")
            self.buffer = b""
        return data

    def close(self) -> None:
        self.sock.close()


def answer_of(command: type[amp.Command], box: dict[bytes, bytes]) -> dict[str, Any]:
    assert b"_answer" in box, box
    return command.parseResponse(amp.AmpBox(box), None)


def error_code(box: dict[bytes, bytes] | None) -> bytes | None:
    return None if box is None else box.get(b"_error_code")


# -- waiting and reading ----------------------------------------------------------


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def log_lines(node: DqidProcess, pattern: str) -> list[str]:
    return [line for line in node.log_text().splitlines() if re.search(pattern, line)]


def stats(node: DqidProcess) -> dict[str, Any]:
    return node.http("GET", "/stats").json()


def ready_status(node: DqidProcess) -> int:
    return node.http("GET", "/ready", timeout=5).status


def push_ids(node: DqidProcess, count: int, body: bytes = b"job") -> list[str]:
    ids = []
    for i in range(count):
        reply = node.http("POST", "/push", body + b" %d" % i)
        assert reply.status == 201, (reply.status, reply.body)
        ids.append(reply.json()["id"])
    return ids


def held(cluster: LocalCluster, holder: str, owner: str) -> int:
    return stats(cluster[holder])["peers"][owner]["held"]


def other_key_file(directory: Path) -> Path:
    """Another cluster's key (right size and mode, wrong secret)."""
    return cluster_key_file(directory, "other-cluster.key")


def separate_node(pool, directory: str, node_id: str, *args: str, **kw: Any) -> DqidProcess:
    """A pooled process whose log lives in its own directory, beside a
    real node of the same id."""
    process = pool.node(node_id, *args, **kw)
    process.workdir = pool.workdir / directory
    return process


def peer_args(cluster: LocalCluster, node_id: str) -> list[str]:
    return [f"--peer={other}=127.0.0.1:{cluster.ports[other][1]}"
            for other in cluster.ids if other != node_id]


# -- options ------------------------------------------------------------------------


def test_peer_without_a_cluster_key_is_one_line_and_exit_2() -> None:
    result = run_dqid(["--node-id=a", "--peer=b=127.0.0.1:1",
                       f"--amp=tcp:{free_port()}:interface=127.0.0.1"])
    assert result.returncode == 2, result
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--cluster-key-file" in lines[0] and "--peer" in lines[0]


@pytest.mark.parametrize("content, mode, problem", [
    (None, None, "no such file"),
    (b"k" * 32, 0o644, "open to group or others"),
])
def test_unusable_cluster_key_file_is_one_line_and_exit_2(tmp_path, content, mode,
                                                         problem) -> None:
    path = tmp_path / "cluster.key"
    if content is not None:
        path.write_bytes(content)
        os.chmod(path, mode)
    result = run_dqid(["--node-id=a", "--peer=b=127.0.0.1:1", f"--cluster-key-file={path}"])
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--cluster-key-file" in lines[0] and problem in lines[0], lines[0]


# -- a node with the wrong key -------------------------------------------------------


def test_impostor_with_the_wrong_key_never_joins_and_the_cluster_replicates(pool) -> None:
    cluster = LocalCluster(pool, "abc").start()
    before = {n: stats(cluster[n]) for n in "abc"}
    c_joined = {n: len(log_lines(cluster[n], r"peer c connected")) for n in "ab"}
    # Node id c, the peers a and b, its own ports, another cluster's key.
    impostor = separate_node(
        pool, "impostor", "c", *peer_args(cluster, "c"),
        f"--cluster-key-file={other_key_file(pool.workdir)}",
        http_port=free_port(), amp_port=free_port())
    impostor.start()
    impostor.wait_for("/health", 20)
    # It dials a and b (and retries); each time it finds they do not share its key.
    for name in "ab":
        address = f"127.0.0.1:{cluster.ports[name][1]}"
        wait_until(lambda: log_lines(impostor, rf"refused peer connection from {address}: "
                                               r".*did not prove the cluster key"),
                   SETTLE + 5, f"the impostor to be refused by {name}")
    # Meanwhile the real members replicate: each one's pushes are held by
    # the other two (the real c included).
    for name in "abc":
        push_ids(cluster[name], 3, name.encode())
    time.sleep(SETTLE)
    push_ids(cluster["a"], 2, b"later")
    for holder in "abc":
        assert ready_status(cluster[holder]) == 200, holder
        now = stats(cluster[holder])
        for owner in "abc":
            if owner != holder:
                expected = before[holder]["peers"][owner]["held"] + (5 if owner == "a" else 3)
                wait_until(lambda: held(cluster, holder, owner) == expected, 5,
                           f"{holder} to hold {expected} of {owner}'s")
                # c is still the real c: same epoch, connected.
                assert now["peers"][owner]["connected"] is True
                assert now["peers"][owner]["epoch"] == before[holder]["peers"][owner]["epoch"]
    # The impostor never synced, never served, never linked.
    assert ready_status(impostor) == 503
    mine = stats(impostor)
    assert all(not peer["connected"] for peer in mine["peers"].values()), mine["peers"]
    assert "recovering" in (mine["not_ready_reason"] or "")
    for name in "abc":
        assert "fenced" not in cluster[name].log_text()
        assert "Traceback" not in cluster[name].log_text()
    # The real c was never taken for gone, nor linked again.
    for name in "ab":
        assert len(log_lines(cluster[name], r"peer c connected")) == c_joined[name]
        assert not log_lines(cluster[name], r"peer c is down")
    # a and b logged each refusal with the impostor's address (the ports it
    # dialled them from, as its own log shows).
    for name in "ab":
        dialled_from = {
            int(port) for port in re.findall(
                rf"connection established \(HOST:IPv4Address\(type='TCP', host='127.0.0.1', "
                rf"port=(\d+)\) PEER:IPv4Address\(type='TCP', host='127.0.0.1', "
                rf"port={cluster.ports[name][1]}\)\)", impostor.log_text())}
        assert dialled_from, impostor.log_tail()
        logged_from = {
            int(port) for port in re.findall(
                r"refused peer connection from 127\.0\.0\.1:(\d+): .*cluster key",
                cluster[name].log_text())}
        assert dialled_from & logged_from, (name, dialled_from, logged_from)


# -- the outsider of issue 9 ----------------------------------------------------------


def outsider_steps(members: list[str], claimed: str, ids: list[str],
                   copies: list[str]) -> list[tuple[type, dict]]:
    """The issue's script: Hello as a member with a huge epoch, then take,
    ack, read and forge (a Stream of records, states and tombstones, and a
    Copied, neither of which is ever answered).  ``ids`` are the victim's
    own messages, ``copies`` another member's that it holds."""
    stones = Tombstones()
    for message_id in [*ids, *copies]:
        mid = parse_id(message_id)
        stones.add(mid.node, mid.epoch, mid.seq)
    forged = [Record(format_id(claimed, MAX_EPOCH, seq), b"forged") for seq in (1, 2)]
    set_aside = [Record(message_id, b"", deliveries=99, held=True) for message_id in copies]
    return [
        (cmd.Hello, dict(version_min=cmd.PROTOCOL_MIN, version_max=cmd.PROTOCOL_MAX,
                         node=claimed, epoch=MAX_EPOCH, cluster=members)),
        (cmd.Take, dict(count=1000, visibility=3600.0)),
        (cmd.Ack, dict(ids=ids)),
        (cmd.SyncStart, {}),
        (cmd.Stream, dict(epoch=MAX_EPOCH, seq=1, records=encode_records(forged))),
        (cmd.Stream, dict(epoch=MAX_EPOCH, states=encode_states(set_aside))),
        (cmd.Stream, dict(epoch=1, tombstones=encode_tombstones(stones))),
        (cmd.Copied, dict(upto=1, holder=True)),
        (cmd.Announce, dict(node=claimed, epoch=MAX_EPOCH)),
    ]


def test_outsider_script_is_refused_at_every_step(pool) -> None:
    cluster = LocalCluster(pool, "abc").start()
    victim = cluster["b"]
    amp_port = cluster.ports["b"][1]
    ids = push_ids(victim, 5, b"b")
    copies = push_ids(cluster["a"], 2, b"a")
    before = {n: stats(cluster[n]) for n in "abc"}
    members = sorted([before["b"]["node"], *before["b"]["peers"]])  # as /stats tells
    addresses = []
    for command, arguments in outsider_steps(members, "a", ids, copies):
        outsider = RawAmp(amp_port)
        addresses.append(outsider.address)
        answer = outsider.call(command, **arguments)
        assert answer is None and outsider.closed, (command.__name__, answer)
        outsider.close()
    # All in one burst on one connection: still nothing answered.
    outsider = RawAmp(amp_port)
    addresses.append(outsider.address)
    for command, arguments in outsider_steps(members, "c", ids, copies):
        outsider.send(command, **arguments)
    assert outsider.hung_up()
    outsider.close()
    # Each connection was refused with a warning naming it.
    for address in addresses:
        wait_until(lambda: log_lines(victim, rf"refused peer connection from {address}: "
                                             r".* before authentication"),
                   5, f"b to log the refusal of {address}")
    # Nothing changed: every node ready, b's queue whole, no epoch claimed.
    for name in "abc":
        assert ready_status(cluster[name]) == 200, name
        now = stats(cluster[name])
        assert (now["depth"], now["ready"], now["leased"]) == \
            (before[name]["depth"], before[name]["ready"], before[name]["leased"]), name
        for peer, seen in now["peers"].items():
            assert seen["epoch"] == before[name]["peers"][peer]["epoch"], (name, peer)
            assert seen["held"] == before[name]["peers"][peer]["held"], (name, peer)
            assert seen["connected"] is True
    got = victim.http("GET", "/get?count=100&visibility=30").json()["messages"]
    assert sorted(m["id"] for m in got) == sorted(ids)
    assert "Traceback" not in victim.log_text()


def test_wrong_key_is_auth_failed_and_the_right_key_gets_in(pool) -> None:
    """Over real TCP the refusal is an AUTH_FAILED answer, then a hang-up.
    The same script with the cluster's key passes the handshake: the
    refusals above are the key's doing, not a broken client."""
    cluster = LocalCluster(pool, "ab").start()
    amp_port = cluster.ports["b"][1]
    own = push_ids(cluster["b"], 2, b"b")
    withdrawn = Tombstones()
    for message_id in own:
        mid = parse_id(message_id)
        withdrawn.add(mid.node, mid.epoch, mid.seq)
    silent = RawAmp(amp_port, timeout=10.0)  # connects and never says a word
    connected_at = time.monotonic()
    right = load_cluster_key(cluster_key_file(pool.workdir))
    for key, works in ((b"not the cluster key, 32 bytes ok", False), (right, True)):
        client = RawAmp(amp_port)
        handshake = DiallerHandshake(right if works else key, "a", "b")
        challenge = handshake.challenge()
        box = client.call(AuthChallenge, node="a", nonce=challenge.nonce)
        answer = answer_of(AuthChallenge, box)
        if works:
            proof = handshake.answered(answer["node"], answer["nonce"], answer["proof"])
        else:
            proof = make_proof(key, DIALLER, challenge.nonce, answer["nonce"], "a", "b")
        box = client.call(AuthProve, proof=proof)
        if works:
            assert answer_of(AuthProve, box) == {}
            # A Stream before Hello is not answered: it is logged and
            # dropped, and the connection stays (the next call is answered,
            # after the Stream: boxes on one connection go in order).
            client.send(cmd.Stream, epoch=1, seq=1, records=encode_records(
                [Record(format_id("a", 1, 1), b"forged")]),
                tombstones=encode_tombstones(withdrawn))
            assert error_code(client.call(cmd.SyncStart)) == b"NOT_HOLDER"  # no Hello yet
            wait_until(lambda: log_lines(cluster["b"], rf"bad Stream from peer None at "
                                                       rf"{client.address}: .*before Hello"),
                       5, "b to log the Stream before Hello")
            assert not client.closed
        else:
            assert error_code(box) == b"AUTH_FAILED", box
            assert client.hung_up()
            wait_until(lambda: log_lines(cluster["b"], rf"refused peer connection from "
                                                       rf"{client.address}: .*cluster key"),
                       5, "b to log the failed proof")
        client.close()
    # The silent one is hung up on after the auth timeout (5 s), not before.
    assert silent.hung_up()
    assert time.monotonic() - connected_at >= 4.5
    silent.close()
    assert log_lines(cluster["b"], rf"refused peer connection from {silent.address}: "
                                   r"no authentication in time")
    assert all(ready_status(cluster[n]) == 200 for n in "ab")
    # The Stream before Hello withdrew nothing and stored nothing.
    now = stats(cluster["b"])
    assert (now["depth"], now["ready"]) == (2, 2), now
    assert now["peers"]["a"]["held"] == 0
    assert "Traceback" not in cluster["b"].log_text()


# -- mutual TLS ------------------------------------------------------------------------


def tls_args(files) -> list[str]:
    return [f"--peer-tls-cert={files.cert}", f"--peer-tls-key={files.key}",
            f"--peer-tls-ca={files.ca}"]


def client_tls(files=None, ca: Path | None = None) -> ssl.SSLContext:
    """A TLS client context trusting ``ca``, presenting ``files``' certificate
    if given."""
    context = ssl.create_default_context(cafile=str(ca))
    if files is not None:
        context.load_cert_chain(str(files.cert), str(files.key))
    return context


def hello_box() -> dict[str, Any]:
    return dict(version_min=cmd.PROTOCOL_MIN, version_max=cmd.PROTOCOL_MAX, node="b",
                epoch=MAX_EPOCH, cluster=["a", "b", "c"])


def test_mutual_tls_links_the_cluster_and_refuses_a_foreign_certificate(pool) -> None:
    pki = make_pki(pool.workdir / "pki", "abc", foreign="c")
    cluster = LocalCluster(pool, "abc", "--min-copies=2",
                           node_args=lambda node_id: tls_args(pki.nodes[node_id])).start()
    # Linked and replicating over TLS.
    push_ids(cluster["a"], 2, b"over tls")
    for holder in "bc":
        wait_until(lambda: held(cluster, holder, "a") == 2, 5, f"{holder} to hold a's")
    assert all(peer["connected"] for n in "abc" for peer in stats(cluster[n])["peers"].values())
    a_port = cluster.ports["a"][1]
    # Plain TCP on a TLS port: no AMP answer, the node hangs up.
    plain = RawAmp(a_port)
    plain.send(cmd.Hello, **hello_box())
    rest = plain.rest()
    assert b"_answer" not in rest and b"_error" not in rest, rest
    plain.close()
    # TLS without a client certificate: the TLS layer refuses it (an alert).
    anonymous = RawAmp(a_port, tls=client_tls(ca=pki.ca))
    anonymous.send(cmd.Hello, **hello_box())
    assert anonymous.read_box() is None and anonymous.closed
    assert isinstance(anonymous.error, ssl.SSLError), anonymous.error
    anonymous.close()
    # The CA's certificate is not the cluster key: still nothing answered.
    certified = RawAmp(a_port, tls=client_tls(pki.nodes["b"], pki.ca))
    assert certified.call(cmd.Hello, **hello_box()) is None and certified.closed
    certified.close()
    wait_until(lambda: log_lines(cluster["a"], rf"refused peer connection from "
                                               rf"{certified.address}: 'Hello' before"),
               5, "a to refuse the certified client without the key")
    # The first two never reached AMP: TLS stopped them.
    for stopped in (plain, anonymous):
        assert not log_lines(cluster["a"], rf"from {stopped.address}: 'Hello'")
    # c is replaced by a process with the right key but a foreign CA's certificate.
    cluster["c"].kill()
    c_http, c_amp = cluster.ports["c"]
    impostor = separate_node(pool, "foreign", "c", *peer_args(cluster, "c"),
                             f"--cluster-key-file={cluster_key_file(pool.workdir)}",
                             *tls_args(pki.foreign["c"]), http_port=c_http, amp_port=c_amp)
    impostor.start()
    impostor.wait_for("/health", 20)
    # a and b dial it and refuse its certificate (and it refuses theirs).
    for name in "ab":
        refused = rf"refused peer connection from 127.0.0.1:{c_amp}: .*certificate verify failed"
        wait_until(lambda: log_lines(cluster[name], refused), SETTLE + 5,
                   f"{name} to refuse the foreign certificate")
    push_ids(cluster["a"], 3, b"without c")
    wait_until(lambda: held(cluster, "b", "a") == 5, 5, "b to hold a's new messages")
    time.sleep(SETTLE)
    for name in "ab":
        assert ready_status(cluster[name]) == 200
        assert stats(cluster[name])["peers"]["c"]["connected"] is False
    assert ready_status(impostor) == 503
    mine = stats(impostor)
    assert all(not peer["connected"] for peer in mine["peers"].values())
    assert all(peer["held"] == 0 for peer in mine["peers"].values())
    assert "recovering" in (mine["not_ready_reason"] or "")

"""Copies kept as runs (DESIGN.md, "Replication"; :class:`dqid.replica.Run`).

A turn's fresh pushes reach each replica as one Stream box, and the replica
keeps them as the bytes they came in: a packed run from a protocol 4 peer,
records (scanned into a run) from a protocol 3 one.  Every test runs with
both.  Everything a copy is for must work
on them as on any other copy: states from the owner, acks (at the owner and
through a replica), a peek while the owner is down, and the recovery of a
replacement.  Over the AMP harness (iosim, a Clock).
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred

from dqid import amp_commands as cmd
from dqid.amp_protocol import PeerProtocol
from dqid.ids import format_id
from dqid.node import PushItem
from dqid.wire import decode_records, encode_run

from .helpers import successResultOf
from .test_cluster_amp import _replace_a, got, ids_in_queue, make, nets  # noqa: F401

COUNT = 40  # more than RUN_MIN_RECORDS


@pytest.fixture(autouse=True, params=[cmd.PROTOCOL_MAX, 3], ids=["packed", "protocol-3"])
def protocol(request, monkeypatch) -> int:
    """The protocol every node speaks (3: as before packed runs)."""
    monkeypatch.setattr(cmd, "PROTOCOL_MAX", request.param)
    return request.param


@pytest.fixture
def boxes(monkeypatch) -> list[dict]:
    """The records and runs of every Stream box sent."""
    sent: list[dict] = []
    send = PeerProtocol.send

    def sending(self, command, **values):
        if command is cmd.Stream and (values.get("records") or values.get("run")):
            sent.append({"to": self.peer_id, "version": self.version,
                         "records": values.get("records"), "run": values.get("run")})
        return send(self, command, **values)

    monkeypatch.setattr(PeerProtocol, "send", sending)
    return sent


def push_batch(net, member, count: int = COUNT) -> list[str]:
    pushed = member.node.push_many([PushItem(b"job%d" % i, "text/plain")
                                    for i in range(count)])
    if isinstance(pushed, Deferred):
        pushed = settled(net, pushed)
    return pushed.ids


def kept_as_a_run(member, owner: str) -> bool:
    store = member.cluster.store
    return owner in store._runs and owner not in store._records


def test_a_batch_push_is_held_as_a_run_by_every_replica(make, protocol, boxes):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    ids = push_batch(net, a)
    assert sorted(box["to"] for box in boxes) == ["b", "c"]
    if protocol >= cmd.PACKED_RUNS:
        assert all(box["run"] and box["records"] is None for box in boxes)
    else:
        assert all(box["records"] and box["run"] is None for box in boxes)
    for replica in (b, c):
        assert replica.held("a") == COUNT
        assert kept_as_a_run(replica, "a")
        records = sorted(replica.cluster.store.records("a"), key=lambda r: ids.index(r.id))
        assert [(r.id, r.body, r.content_type) for r in records] == [
            (message_id, b"job%d" % i, "text/plain") for i, message_id in enumerate(ids)]


def test_a_sync_pages_through_copies_held_as_runs(make):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    ids = push_batch(net, a)
    transfer = b.cluster.transfer
    start = transfer.on_sync_start()
    assert start["total"] == COUNT  # b owns nothing: its copies of a's
    paged: list[str] = []
    more = True
    while more:
        page = transfer.on_sync_page(start["token"])
        paged += [r.id for r in decode_records(page["records"])]
        more = page["more"]
    assert sorted(paged) == sorted(ids)


def test_states_and_acks_reach_copies_held_as_a_run(make):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    ids = push_batch(net, a)
    leased = got(net, a, count=5)
    assert [m.id for m in leased] == ids[:5]
    net.advance(0.2)  # past states_linger: the deliveries go to the replicas
    for replica in (b, c):
        assert [replica.cluster.store.get(i).deliveries for i in ids[:6]] == [1] * 5 + [0]
    for message_id in ids[:3]:
        settled(net, a.ack(message_id))
    settled(net, b.ack(ids[3]))  # through a replica holding the copy
    net.settle()
    for replica in (b, c):
        assert replica.held("a") == COUNT - 4
    assert ids_in_queue(a) == ids[4:]


def test_a_replica_answers_a_peek_from_its_run_while_the_owner_is_down(make):
    net = make("abc", min_copies=2)
    a, b, c = net.start_all()
    ids = push_batch(net, a)
    net.cut("a")
    message, state = settled(net, b.node.peek(ids[7]))
    assert (message.id, message.body, state) == (ids[7], b"job7", "ready")


def test_a_replacement_recovers_every_message_its_peers_hold_as_runs(make):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    ids = push_batch(net, a)
    for message_id in ids[:2]:
        settled(net, a.ack(message_id))
    net.advance(0.5)
    old, a2 = _replace_a(net, keep_old=False)
    for peer in "bc":
        net.connect("a", peer)
    net.settle()
    assert a2.node.readiness.reason() is None
    assert ids_in_queue(a2) == ids[2:]
    assert [m.body for m in got(net, a2, count=3)] == [b"job2", b"job3", b"job4"]
    for replica in (b, c):
        assert replica.held("a") == COUNT - 2


@pytest.mark.parametrize("protocol", [cmd.PROTOCOL_MAX], indirect=True, ids=["packed"])
def test_a_peer_that_speaks_protocol_3_gets_records_the_others_a_run(make, boxes):
    # A rolling upgrade: B is not upgraded yet.
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    for link in net.links_between("a", "b"):
        link.client.version = link.server.version = 3
    ids = push_batch(net, a)
    assert {box["to"]: (box["records"] is not None, box["run"] is not None)
            for box in boxes} == {"b": (True, False), "c": (False, True)}
    for replica in (b, c):
        assert replica.held("a") == COUNT and kept_as_a_run(replica, "a")
        assert sorted(r.id for r in replica.cluster.store.records("a")) == sorted(ids)


@pytest.mark.parametrize("protocol", [cmd.PROTOCOL_MAX], indirect=True, ids=["packed"])
def test_a_packed_run_on_a_protocol_3_link_is_refused(make):
    net = make("abc", min_copies=3)
    a, b, c = net.start_all()
    (link,) = net.links_between("a", "b")
    link.client.version = link.server.version = 3
    end = link.client if link.dialler == "a" else link.server
    end.send(cmd.Stream, epoch=a.node.epoch, seq=1,
             run=encode_run(format_id("a", a.node.epoch, 500), None, [b"x"] * 20))
    net.settle()
    assert b.held("a") == 0
    assert any("a packed run in protocol 3" in line for line in net.logged())


def settled(net, d: Deferred):
    """The result of ``d`` once the net has settled."""
    net.settle()
    return successResultOf(d)

"""GET /cluster's document gathered over AMP (dqid.cluster_view), and the
dqid release each side says at Hello.

Nodes in memory over real AMP (:mod:`tests.amp_harness`): one Clock, so
"within the timeout" is exact.
"""

from __future__ import annotations

from typing import Iterator

import pytest
from twisted.logger import LogLevel

import dqid
from dqid import amp_commands as cmd
from dqid.timings import DEFAULT_TIMINGS

from .amp_harness import Net
from .helpers import assertNoResult, successResultOf

TIMEOUT = DEFAULT_TIMINGS.cluster_stats_timeout


@pytest.fixture
def net() -> Iterator[Net]:
    made = Net(["a", "b", "c"], 2)
    yield made
    assert made.close() == []
    assert made.failures() == []


def test_every_node_answers_with_its_own_stats(net):
    a, b, c = net.start_all()
    pushed = b.push(b"job")
    net.settle()
    successResultOf(pushed)

    d = a.cluster.view.gather()
    net.settle()
    document = successResultOf(d)
    assert document["node"] == "a"
    assert sorted(document["nodes"]) == ["a", "b", "c"]
    for name, member in (("a", a), ("b", b), ("c", c)):
        entry = document["nodes"][name]
        assert entry["up"] is True, entry
        assert entry["stats"] == member.node.stats()
        assert entry["stats"]["version"] == dqid.__version__
    assert document["nodes"]["b"]["stats"]["depth"] == 1
    assert document["nodes"]["a"]["stats"]["peers"]["b"]["held"] == 1


def test_a_node_that_does_not_answer_in_time_is_down(net):
    a, b, c = net.start_all()
    net.pause("c")  # c's links carry nothing: c is silent
    d = a.cluster.view.gather()
    net.settle()
    assertNoResult(d)
    net.advance(TIMEOUT - 0.1)
    assertNoResult(d)
    net.advance(0.1)
    document = successResultOf(d)
    assert document["nodes"]["b"]["up"] is True
    assert document["nodes"]["c"] == {
        "up": False, "error": f"no answer within {TIMEOUT:g} s"}
    net.resume("c")


def test_a_node_without_a_link_is_down_at_once(net):
    a, b, c = net.start_all()
    net.cut("c")
    d = a.cluster.view.gather()
    net.settle()  # b answers; nothing waits for c
    document = successResultOf(d)
    assert document["nodes"]["b"]["up"] is True
    assert document["nodes"]["c"] == {"up": False, "error": "not linked"}


def test_a_peer_that_does_not_know_node_stats_is_down_with_why(net, monkeypatch):
    a, b, c = net.start_all()
    # c runs an older dqid: no NodeStats responder.
    for link in net.links_of("c"):
        for protocol in (link.client, link.server):
            if protocol.handlers is c.cluster:
                monkeypatch.setattr(
                    protocol, "locateResponder",
                    lambda name, _old=protocol.locateResponder: (
                        None if name == cmd.NodeStats.commandName else _old(name)))
    d = a.cluster.view.gather()
    net.settle()
    document = successResultOf(d)
    assert document["nodes"]["c"] == {
        "up": False, "error": "it does not answer NodeStats (an older dqid?)"}
    assert document["nodes"]["b"]["up"] is True


def test_a_stats_answer_that_is_not_a_document_is_down(net, monkeypatch):
    a, b, c = net.start_all()
    monkeypatch.setattr(c.cluster.view, "on_node_stats", lambda: b"[1, 2")
    d = a.cluster.view.gather()
    net.settle()
    assert successResultOf(d)["nodes"]["c"] == {
        "up": False, "error": "its answer is not a stats document"}


def test_each_side_logs_the_release_the_other_runs_once(net):
    net.start_all()
    lines = [line for line in net.logged(LogLevel.info) if " runs dqid " in line]
    expected = {f"peer {peer} runs dqid {dqid.__version__} (protocol {cmd.PROTOCOL_MAX})"
                for peer in "abc"}
    assert set(lines) == expected
    assert len(lines) == 6  # each of three nodes, about each of its two peers
    events = [e for e in net.events if e.get("software")]
    assert {e["peer"] for e in events} == {"a", "b", "c"}


def test_a_hello_without_the_release_still_links(net):
    """A protocol-2 peer that does not send ``software`` (an older dqid)."""
    net.build("a")
    net.build("b")
    link = net.connect("a", "b")
    net.settle()
    # Hello again from a bare AMP client, as an older peer would send it.
    answer = link.client.callRemote(
        cmd.Hello, version_min=cmd.PROTOCOL_MIN, version_max=cmd.PROTOCOL_MAX,
        node="a", epoch=0, cluster=["a", "b", "c"])
    net.settle()
    result = successResultOf(answer)
    assert result["node"] == "b" and result["software"] == dqid.__version__
    assert f"peer a runs dqid (not said) (protocol {cmd.PROTOCOL_MAX})" in net.logged(
        LogLevel.info)

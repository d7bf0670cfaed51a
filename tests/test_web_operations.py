"""GET /metrics, GET /cluster on a standalone node, GET /openapi.json and
``version`` in /stats (DESIGN.md, "Operations").

See :mod:`tests.web_harness` for the harness: one standalone node on a
Clock, driven through StubTreq.
"""

from __future__ import annotations

import importlib.metadata
import json
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

import dqid
from dqid.errors import NotReplicated
from dqid.http_auth import BearerGate
from dqid.node import QueueNode
from dqid.tokens import TokenSet
from dqid.web import HttpApi

from .helpers import successResultOf
from .web_harness import Reply, assert_error, h, make


def scrape(h) -> dict[str, dict[tuple, float]]:
    """GET /metrics parsed: {sample name: {labels as sorted items: value}}."""
    reply = h.call("GET", "/metrics")
    assert reply.code == 200, reply
    content_type = reply.header("Content-Type")
    assert content_type.startswith("text/plain; version="), content_type
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(reply.body.decode("utf-8")):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    return samples


def value(samples: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


# -- /metrics -------------------------------------------------------------------------


def test_metrics_read_the_same_numbers_as_stats(make):
    h = make(size=6, max_deliveries=2)
    first = h.push(b"a")
    h.push(b"b")
    receipt = h.take().header("Dqid-Receipt")
    h.call("POST", f"/nack/{first}?receipt={receipt}")
    h.take()  # first again: a redelivery
    h.call("POST", f"/ack/{first}")
    h.call("POST", "/push?delay=60", b"later")
    for _ in range(4):
        h.push(b"fill")
    assert h.call("POST", "/push", b"over").code == 429

    samples = scrape(h)
    stats = h.stats()
    for gauge, key in [("dqid_depth", "depth"), ("dqid_ready", "ready"),
                       ("dqid_leased", "leased"), ("dqid_held", "held"),
                       ("dqid_delayed", "delayed"), ("dqid_size", "size")]:
        assert value(samples, gauge) == stats[key], gauge
    assert (stats["depth"], stats["ready"], stats["delayed"], stats["size"]) == (6, 5, 1, 6)
    counters = stats["counters"]
    for counter in ("pushed", "delivered", "redelivered", "acked", "rejected_full"):
        assert value(samples, f"dqid_{counter}_total") == counters[counter], counter
    assert (counters["pushed"], counters["delivered"], counters["redelivered"],
            counters["acked"], counters["rejected_full"]) == (7, 2, 1, 1, 1)
    assert value(samples, "dqid_ready_to_serve") == 1
    assert value(samples, "dqid_not_replicated_total") == 0
    assert value(samples, "dqid_info", node="n1", version=dqid.__version__) == 1
    assert "dqid_peer_connected" not in samples  # a standalone node has no peers


def test_metrics_follow_the_node_without_a_second_set_of_counters(h):
    before = scrape(h)
    assert value(before, "dqid_pushed_total") == 0
    h.push(b"a")
    h.node.queue.counters.pushed += 10  # what /stats reads is what /metrics reads
    assert value(scrape(h), "dqid_pushed_total") == 11


def test_a_node_that_stopped_is_not_ready_to_serve(h):
    h.node.shutdown()
    assert value(scrape(h), "dqid_ready_to_serve") == 0


def test_the_age_of_the_oldest_ready_message(h):
    assert value(scrape(h), "dqid_oldest_ready_age_seconds") == 0  # nothing ready
    assert h.stats()["oldest_ready_age"] is None
    h.clock.advance(100.0)
    h.push(b"first")
    h.clock.advance(5.0)
    h.push(b"second")
    h.clock.advance(2.5)
    assert value(scrape(h), "dqid_oldest_ready_age_seconds") == pytest.approx(7.5)
    assert h.stats()["oldest_ready_age"] == pytest.approx(7.5)
    h.take("?visibility=10")  # first is leased: second is next in line
    assert value(scrape(h), "dqid_oldest_ready_age_seconds") == pytest.approx(2.5)
    h.clock.advance(10.0)  # first's lease ran out: it is back, 17.5 s old
    assert value(scrape(h), "dqid_oldest_ready_age_seconds") == pytest.approx(17.5)


def test_every_push_answer_is_timed(h):
    h.push(b"a")
    h.push_batch([{"body": "b"}, {"body": "c"}])
    assert h.call("POST", "/push", b"").code == 400
    samples = scrape(h)
    assert value(samples, "dqid_push_seconds_count") == 3
    assert value(samples, "dqid_push_seconds_sum") == 0  # the Clock did not move
    assert value(samples, "dqid_push_seconds_bucket", le="0.0005") == 3


class SlowRemote:
    """A cluster whose copies take as long as the test says (a node's Remote,
    only the parts a push and /stats use)."""

    def __init__(self) -> None:
        self.replicating: list[Deferred] = []

    def replicate(self, messages: Any) -> Deferred:
        d: Deferred = Deferred()
        self.replicating.append(d)
        return d

    def stats(self) -> dict[str, Any]:
        return {"min_copies": 2, "peers": {
            "b": {"connected": True, "held": 3}, "c": {"connected": False, "held": 0}}}

    def states_changed(self, messages: Any) -> None:
        pass

    def stop(self) -> None:
        pass


@pytest.fixture
def clustered() -> tuple[Any, Clock, SlowRemote]:
    clock = Clock()
    node = QueueNode("a", 10, clock, epoch=1)
    remote = SlowRemote()
    node.attach(remote)  # type: ignore[arg-type]
    api = HttpApi(node, 1024)
    return StubTreq(api.resource()), clock, remote


def request(stub: StubTreq, method: str, path: str, body: bytes | None = None) -> Deferred:
    d = stub.request(method, "http://dqid.test" + path, data=body)
    return d.addCallback(lambda response: stub.content(response).addCallback(
        lambda content: Reply(response.code, response.headers, content)))


def test_push_seconds_measure_replication_and_refusals_are_counted(clustered):
    stub, clock, remote = clustered
    accepted = request(stub, "POST", "/push", b"job")
    clock.advance(0.02)
    remote.replicating.pop().callback(None)
    stub.flush()
    assert successResultOf(accepted).code == 201

    refused = request(stub, "POST", "/push", b"job")
    clock.advance(3.0)
    remote.replicating.pop().errback(NotReplicated("no copies in time"))
    stub.flush()
    assert_error(successResultOf(refused), 503, "not_replicated")

    reply = successResultOf(request(stub, "GET", "/metrics"))
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = \
                sample.value
    assert value(samples, "dqid_push_seconds_count") == 2
    assert value(samples, "dqid_push_seconds_sum") == pytest.approx(3.02)
    assert value(samples, "dqid_push_seconds_bucket", le="0.025") == 1
    assert value(samples, "dqid_push_seconds_bucket", le="2.5") == 1
    assert value(samples, "dqid_push_seconds_bucket", le="5.0") == 2
    assert value(samples, "dqid_not_replicated_total") == 1
    assert value(samples, "dqid_peer_connected", peer="b") == 1
    assert value(samples, "dqid_peer_connected", peer="c") == 0
    assert value(samples, "dqid_peer_held", peer="b") == 3
    assert value(samples, "dqid_min_copies") == 2


# -- tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/metrics", "/cluster", "/openapi.json"])
def test_operations_routes_need_the_token_like_stats(tmp_path, path):
    tokens = tmp_path / "tokens"
    tokens.write_text("good-token\n")
    node = QueueNode("n", 10, Clock(), epoch=1)
    stub = StubTreq(BearerGate(HttpApi(node, 1024).resource(), TokenSet(tokens)))

    def get(token: str | None) -> int:
        headers = {"Authorization": [f"Bearer {token}"]} if token else {}
        return successResultOf(stub.request("GET", "http://n" + path, headers=headers)).code

    assert get(None) == 401
    assert get("wrong") == 401
    assert get("good-token") == 200


# -- /cluster, /stats version, /openapi.json --------------------------------------------


def test_a_standalone_node_lists_only_itself_in_the_cluster_view(h):
    h.push(b"a")
    reply = h.call("GET", "/cluster")
    assert reply.code == 200
    document = reply.json()
    assert document == {"node": "n1", "nodes": {"n1": {"up": True, "stats": h.stats()}}}


def test_stats_name_the_version_of_the_installed_package(h):
    assert h.stats()["version"] == importlib.metadata.version("dqid") == dqid.__version__


def test_the_openapi_document_is_served_as_the_packaged_file(h):
    reply = h.call("GET", "/openapi.json")
    assert reply.code == 200
    assert reply.header("Content-Type") == "application/json"
    with open(dqid.__path__[0] + "/openapi.json", "rb") as packaged:
        assert reply.body == packaged.read()
    assert json.loads(reply.body)["openapi"].startswith("3.")

"""dqid.logs: the JSON log observer that ``--log-format=json`` and
``twistd --logger=dqid.logs.json_observer`` use."""

from __future__ import annotations

import io
import json

from twisted.logger import Logger, LogPublisher, eventFromJSON
from twisted.python.reflect import namedAny

from dqid.logs import JSON_OBSERVER, json_observer


def test_each_event_is_one_json_object_per_line_with_its_named_fields(monkeypatch):
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    publisher = LogPublisher(json_observer())
    log = Logger(namespace="dqid.test", observer=publisher)
    log.info("peer {peer} serves as epoch {epoch}", peer="b", epoch=7)
    log.warn("message {id} of {node} held", id="a.1.2", node="a")

    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\x1e" not in out.getvalue()
    first, second = (json.loads(line) for line in lines)
    assert (first["peer"], first["epoch"]) == ("b", 7)
    assert first["log_format"] == "peer {peer} serves as epoch {epoch}"
    assert first["log_namespace"] == "dqid.test"
    assert (second["id"], second["node"]) == ("a.1.2", "a")
    assert eventFromJSON(lines[1])["log_level"].name == "warn"


def test_twistd_finds_the_observer_factory_by_its_dotted_name():
    assert namedAny(JSON_OBSERVER) is json_observer

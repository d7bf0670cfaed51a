"""dqid/openapi.json (GET /openapi.json) against the app and against live
nodes (DESIGN.md, "Operations").

The static tests check that the document is OpenAPI 3, names every route
of the Klein app with its methods and every error code the API answers,
and ships in the wheel.  The live tests run schemathesis (its CLI, as CI
would) against a real standalone node and a real 3-node cluster, both with
bearer tokens: no 5xx, every answer's status, headers, content type and
JSON body as the document says, requests the document calls invalid
refused, requests without the token refused.

Two exceptions, set per operation in schemathesis' config below, because
the document cannot promise more: a delivered or peeked message comes with
the Content-Type its producer sent, whatever text that was (DESIGN: "any
bytes, any Content-Type"), so its media type is not checked; and a push
takes any non-empty bytes with any Content-Type, so schemathesis' "invalid"
push bodies (a JSON number, a form) are rightly queued.  Long polls are
kept out: the copy of the document the test uses has no ``wait``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import dqid
from dqid.web import HttpApi

from .cluster import LocalCluster
from .procs import DqidProcess

DOCUMENT = Path(dqid.__file__).parent / "openapi.json"
ROOT = Path(__file__).resolve().parent.parent
TOKEN = "schemathesis-token-1"
METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}

# Per-operation exceptions (see the module docstring); every other check of
# schemathesis runs everywhere.
SCHEMATHESIS_CONFIG = """\
[[operations]]
include-path-regex = "^/(get|messages/)"
checks.content_type_conformance.enabled = false
checks.response_schema_conformance.enabled = false

[[operations]]
include-path = "/push"
checks.negative_data_rejection.enabled = false
"""


def load() -> dict:
    return json.loads(DOCUMENT.read_text())


def app_routes() -> set[tuple[str, str]]:
    """(OpenAPI path, method) of every rule of the Klein app."""
    routes = set()
    for rule in HttpApi.app.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        routes |= {(path, method) for method in rule.methods & METHODS}
    return routes


def test_the_document_is_openapi_3_and_names_every_route_of_the_app():
    document = load()
    assert document["openapi"].startswith("3.")
    assert document["info"]["version"] == dqid.__version__
    documented = {(path, method.upper()) for path, item in document["paths"].items()
                  for method in item if method.upper() in METHODS}
    assert documented == app_routes()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert operation["responses"], (path, method)
            assert operation.get("summary"), (path, method)


def test_the_document_names_every_error_code_the_api_answers():
    sources = "".join((ROOT / "dqid" / name).read_text()
                      for name in ("web.py", "http_io.py", "http_auth.py"))
    answered = set(re.findall(r'ApiError\(\s*\d+,\s*"(\w+)"', sources))
    answered |= set(re.findall(r'bad_request\([^)]*?,\s*"(\w+)"\)', sources))
    answered |= set(re.findall(r'"error":\s*"(\w+)"', sources))
    answered |= set(re.findall(r'error\.code\s*=\s*"(\w+)"', sources))
    codes = set(load()["components"]["schemas"]["Error"]["properties"]["error"]["enum"])
    assert {"queue_full", "not_replicated", "unauthorized", "lease_lost"} <= answered
    assert answered <= codes, answered - codes
    text = DOCUMENT.read_text()
    for code in codes:  # each is said where it is answered, or as a shared response
        assert text.count(f'"{code}"') >= 2, code


def test_the_document_names_the_headers_and_the_token_scheme():
    document = load()
    text = json.dumps(document)
    for header in ("Idempotency-Key", "Dqid-Id", "Dqid-Deliveries", "Dqid-Receipt",
                   "Dqid-State", "Retry-After", "WWW-Authenticate"):
        assert f'"{header}"' in text, header
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["bearer"]["description"]}
    open_paths = {path for path, item in document["paths"].items()
                  if item.get("get", {}).get("security") == []}
    assert open_paths == {"/health", "/ready", "/ui", "/ui/{name}"}


def test_the_wheel_ships_the_document(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [wheel] = tmp_path.glob("dqid-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("dqid/openapi.json") == DOCUMENT.read_bytes()


# -- schemathesis against live nodes ---------------------------------------------------


def run_schemathesis(workdir: Path, port: int, seconds: int) -> None:
    """schemathesis' CLI against the node on ``port`` for at most ``seconds``
    of fuzzing; fails the test with its report unless it found nothing."""
    document = load()
    for operation in document["paths"]["/get"].values():  # no long polls here
        operation["parameters"] = [p for p in operation["parameters"]
                                   if p.get("$ref") != "#/components/parameters/Wait"]
    schema = workdir / "openapi.json"
    schema.write_text(json.dumps(document))
    config = workdir / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    report = workdir / "schemathesis.txt"
    with open(report, "w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--no-color",
             "--config-file", str(config), "run", str(schema),
             "--url", f"http://127.0.0.1:{port}", "--header", f"Authorization: Bearer {TOKEN}",
             "--max-examples=30", f"--max-time={seconds}", "--seed=1",
             "--generation-database=none", "--request-timeout=10"],
            stdout=out, stderr=subprocess.STDOUT, cwd=workdir, timeout=seconds + 120)
    text = report.read_text()
    assert done.returncode == 0, text[-6000:]
    assert "passed" in text and "Stateful" in text


def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(TOKEN + "\n")
    return path


def assert_no_traceback(*nodes: DqidProcess) -> None:
    for node in nodes:
        assert node.alive(), node.log_tail()
        assert "Traceback" not in node.log_text(), node.log_tail(80)


@pytest.mark.process
def test_schemathesis_finds_nothing_on_a_standalone_node(pool, tmp_path):
    node = pool.node("s1", f"--http-token-file={token_file(tmp_path)}", "--size=100000",
                     "--max-deliveries=2").start()
    node.wait_for("/health")
    run_schemathesis(tmp_path, node.http_port, seconds=25)
    assert_no_traceback(node)


@pytest.mark.process
def test_schemathesis_finds_nothing_on_a_cluster(pool, tmp_path):
    cluster = LocalCluster(pool, ("a", "b", "c"), f"--http-token-file={token_file(tmp_path)}",
                           "--size=100000", "--max-deliveries=2").start()
    run_schemathesis(tmp_path, cluster["b"].http_port, seconds=25)
    assert_no_traceback(*cluster.nodes.values())

"""Command-line options (dqid.options) against DESIGN.md's "Command line".

Defaults follow the table there; every bad option is a ``UsageError`` naming
the option, and under twistd (``TwistdOptions``) it ends the process with
exit code 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest
from twisted.python import usage

from dqid.ids import is_valid_node_id
from dqid.options import Options, PeerAddress, TwistdOptions

from .procs import cluster_key_file


_KEYS = Path(tempfile.mkdtemp(prefix="dqid-options-"))
KEY_FILE = cluster_key_file(_KEYS)


def parsed(*args: str) -> Options:
    """Parse ``args``; a cluster given no key file gets a good one."""
    args_list = list(args)
    if any(a.startswith("--peer=") for a in args_list) and not any(
            a.startswith("--cluster-key-file") for a in args_list):
        args_list.append(f"--cluster-key-file={KEY_FILE}")
    options = Options()
    options.parseOptions(args_list)
    return options


def refused(*args: str) -> str:
    with pytest.raises(usage.UsageError) as caught:
        parsed(*args)
    return str(caught.value)


# -- defaults -------------------------------------------------------------------


def test_defaults_match_the_design_table():
    options = parsed("--node-id=n1")
    assert options["size"] == 1000
    assert options["http"] == "tcp:8080:interface=127.0.0.1"
    assert options["amp"] == "tcp:8081:interface=127.0.0.1"
    assert options["peers"] == []
    assert options["min-copies"] == 1  # every configured node: just this one
    assert options["visibility"] == 30
    assert options["max-message-bytes"] == 262144


def test_node_id_defaults_to_the_host_name(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "worker-7.example.com")
    assert parsed()["node-id"] == "worker-7"


@pytest.mark.parametrize(
    "hostname",
    ["plain", "db_1.internal", "my host!", "é" * 10, "x" * 100, "-" * 80, ".", "",
     "a" * 63 + "-b", "_"],
)
def test_the_default_node_id_is_always_valid(monkeypatch, hostname):
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    assert is_valid_node_id(parsed()["node-id"])


def test_given_values_are_converted():
    options = parsed(
        "--size=5", "--node-id=a_B-9", "--visibility=2.5", "--max-message-bytes=10",
        "--http=tcp:0:interface=127.0.0.1", "--amp=tcp:0:interface=127.0.0.1",
    )
    assert options["size"] == 5
    assert options["node-id"] == "a_B-9"
    assert options["visibility"] == 2.5
    assert options["max-message-bytes"] == 10


def test_node_id_of_64_characters_is_accepted():
    assert parsed("--node-id=" + "a" * 64)["node-id"] == "a" * 64


# -- peers and min-copies -----------------------------------------------------------


def test_peers_are_collected_and_min_copies_defaults_to_every_node():
    options = parsed("--node-id=n1", "--peer=n2=10.0.0.2:8081", "--peer=n3=[::1]:9000")
    assert options["peers"] == [
        PeerAddress("n2", "10.0.0.2", 8081), PeerAddress("n3", "::1", 9000),
    ]
    assert options["min-copies"] == 3


@pytest.mark.parametrize("copies", ["1", "2", "3"])
def test_min_copies_up_to_the_number_of_nodes(copies):
    options = parsed("--node-id=n1", "--peer=n2=h:1", "--peer=n3=h:2",
                     f"--min-copies={copies}")
    assert options["min-copies"] == int(copies)


def test_min_copies_above_the_number_of_nodes_is_refused():
    assert "--min-copies" in refused("--node-id=n1", "--peer=n2=h:1", "--min-copies=3")
    assert "--min-copies" in refused("--node-id=n1", "--min-copies=2")


# -- bad options ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, option",
    [
        (["--size=0"], "--size"),
        (["--size=-3"], "--size"),
        (["--size=abc"], "--size"),
        (["--size=1.5"], "--size"),
        (["--visibility=0"], "--visibility"),
        (["--visibility=-1"], "--visibility"),
        (["--visibility=99999"], "--visibility"),
        (["--visibility=nan"], "--visibility"),
        (["--visibility=soon"], "--visibility"),
        (["--max-message-bytes=0"], "--max-message-bytes"),
        (["--min-copies=0"], "--min-copies"),
        (["--min-copies=two"], "--min-copies"),
        (["--node-id=bad id"], "--node-id"),
        (["--node-id=dot.ted"], "--node-id"),
        (["--node-id=sl/ash"], "--node-id"),
        (["--node-id=" + "a" * 65], "--node-id"),
        (["--node-id="], "--node-id"),
        (["--peer=nonsense"], "--peer"),
        (["--peer=n2"], "--peer"),
        (["--peer=n2=host"], "--peer"),
        (["--peer=n2=:8081"], "--peer"),
        (["--peer=n2=host:0"], "--peer"),
        (["--peer=n2=host:65536"], "--peer"),
        (["--peer=n2=host:http"], "--peer"),
        (["--peer=bad id=host:1"], "--peer"),
        (["--peer==host:1"], "--peer"),
        (["--peer=n2=h:1", "--peer=n2=g:2"], "--peer"),
        (["--node-id=me", "--peer=me=h:1"], "--peer"),
        (["--http=nonsense"], "--http"),
        (["--http=tcp:notaport"], "--http"),
        (["--http=tcp:80:bogus=1"], "--http"),
        (["--http="], "--http"),
        (["--http=ssl:8443:privateKey=/nonexistent/dqid.pem"], "--http"),
        (["--amp=nonsense"], "--amp"),
        (["--amp=tcp:"], "--amp"),
        (["--no-such-option"], "no-such-option"),
    ],
)
def test_bad_options_are_usage_errors_naming_the_option(args, option):
    assert option in refused("--node-id=n1", *args)


def test_stray_arguments_are_refused():
    assert "extra" in refused("--node-id=n1", "extra")


# -- under twistd ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, option",
    [(["--size=abc"], "--size"), (["--peer=nonsense"], "--peer"),
     (["--http=nonsense"], "--http"), (["--min-copies=2"], "--min-copies")],
)
def test_twistd_options_exit_2_with_one_line(capsys, args, option):
    with pytest.raises(SystemExit) as caught:
        TwistdOptions().parseOptions(["--node-id=n1", *args])
    assert caught.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("dqid: ")
    assert option in lines[0]
    assert "Traceback" not in captured.err
    assert "Parameter type enforcement failed" not in captured.err


def test_twistd_options_accept_good_options(capsys):
    options = TwistdOptions()
    options.parseOptions(["--node-id=n1", "--size=7"])
    assert options["size"] == 7
    assert capsys.readouterr().err == ""


# -- security ---------------------------------------------------------------------


def test_a_cluster_needs_a_key_file(capsys):
    with pytest.raises(SystemExit) as caught:
        TwistdOptions().parseOptions(["--node-id=n1", "--peer=n2=h:1"])
    assert caught.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "--cluster-key-file is required with --peer" in line


def test_the_cluster_key_is_read_at_start():
    options = parsed("--node-id=n1", "--peer=n2=h:1")
    assert options["cluster-key"] == KEY_FILE.read_bytes().strip()
    assert parsed("--node-id=n1")["cluster-key"] is None  # standalone: no AMP


@pytest.mark.parametrize("content, mode, problem", [
    (None, 0o600, "no such file"),
    (b"", 0o600, "empty"),
    (b"short key\n", 0o600, "shorter than 16"),
    (b"a key long enough for a cluster\n", 0o640, "open to group or others"),
    (b"a key long enough for a cluster\n", 0o604, "open to group or others"),
])
def test_a_bad_key_file_is_one_line_naming_it(tmp_path, content, mode, problem):
    path = tmp_path / "key"
    if content is not None:
        path.write_bytes(content)
        os.chmod(path, mode)
    message = refused("--node-id=n1", "--peer=n2=h:1", f"--cluster-key-file={path}")
    assert "--cluster-key-file" in message and problem in message
    assert str(path) in message and "\n" not in message


def test_peer_tls_options_go_together(tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    assert "go together" in refused("--node-id=n1", f"--peer-tls-cert={cert}")


def test_peer_tls_files_that_are_not_pem_are_refused(tmp_path):
    for name in ("cert", "key", "ca"):
        (tmp_path / f"{name}.pem").write_text("not a pem file")
    message = refused("--node-id=n1", *(f"--peer-tls-{n}={tmp_path / n}.pem"
                                        for n in ("cert", "key", "ca")))
    assert "--peer-tls-ca" in message and "PEM" in message


def test_http_token_file_is_read_at_start(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# operators\nsecret-one\n\nsecret-two\n")
    options = parsed(f"--http-token-file={tokens}")
    assert len(options["http-tokens"]) == 2
    assert options["http-tokens"].check(b"Bearer secret-two")
    missing = refused(f"--http-token-file={tmp_path / 'none'}")
    assert "--http-token-file" in missing


# -- --config FILE, --log-format, --version (DESIGN.md "Operations") -----------------


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dqid.toml"
    path.write_text(text)
    return path


def test_a_config_file_holds_any_option_and_the_command_line_wins(tmp_path):
    config = config_file(tmp_path, (
        'node-id = "n1"\nsize = 50\nvisibility = 2.5\nmin-copies = 2\n'
        'peer = ["n2=127.0.0.1:9002", "n3=127.0.0.1:9003"]\n'
        f'cluster-key-file = "{KEY_FILE}"\nlog-format = "json"\n'))
    options = parsed(f"--config={config}", "--size=7")
    assert options["node-id"] == "n1"
    assert options["size"] == 7  # the command line wins
    assert options["visibility"] == 2.5
    assert options["min-copies"] == 2
    assert [str(p) for p in options["peers"]] == ["n2=127.0.0.1:9002", "n3=127.0.0.1:9003"]
    assert options["cluster-key"] == KEY_FILE.read_bytes().strip()
    assert options["log-format"] == "json"
    assert options["config"] == str(config)


def test_peers_on_the_command_line_replace_the_files_list(tmp_path):
    config = config_file(tmp_path, 'node-id = "n1"\npeer = ["n2=127.0.0.1:9002"]\n')
    options = parsed("--config", str(config), "--peer=n9=127.0.0.1:9009")
    assert [p.node_id for p in options["peers"]] == ["n9"]
    assert options["min-copies"] == 2


def test_a_config_file_checks_its_values_as_the_command_line_does(tmp_path):
    config = config_file(tmp_path, 'size = "abc"\n')
    assert "--size must be a whole number >= 1" in refused(f"--config={config}")


@pytest.mark.parametrize("text, problem", [
    ("size = \n", "not TOML"),
    ("colour = 'blue'\n", "unknown option 'colour'"),
    ("min_copies = 2\n", "unknown option 'min_copies' (option names use -, not _)"),
    ("config = 'other.toml'\n", "cannot name another"),
    ("version = true\n", "unknown option 'version'"),
    ("size = true\n", "size: must be a string or a number, got bool"),
    ("[http]\nport = 1\n", "http: must be a string or a number, got dict"),
])
def test_a_bad_config_file_is_a_usage_error_naming_it(tmp_path, text, problem):
    config = config_file(tmp_path, text)
    message = refused(f"--config={config}")
    assert message.startswith(f"--config {config}: "), message
    assert problem in message


def test_a_missing_config_file_is_a_usage_error(tmp_path):
    message = refused(f"--config={tmp_path / 'none.toml'}")
    assert "cannot read it" in message


def test_log_format_is_text_or_json():
    assert parsed()["log-format"] == "text"
    assert parsed("--log-format=json")["log-format"] == "json"
    assert "--log-format must be text or json" in refused("--log-format=xml")


class FakeTwistd(dict):
    """The part of twistd's ServerOptions a subcommand sees: its options."""


def test_json_logs_name_dqids_observer_as_twistds_logger():
    options = Options()
    options.parent = FakeTwistd(logger=None)
    options.parseOptions(["--log-format=json"])
    assert options.parent["logger"] == "dqid.logs.json_observer"

    chosen = Options()
    chosen.parent = FakeTwistd(logger="my.own.observer")
    chosen.parseOptions(["--log-format=json"])
    assert chosen.parent["logger"] == "my.own.observer"  # twistd's --logger wins

    text = Options()
    text.parent = FakeTwistd(logger=None)
    text.parseOptions([])
    assert text.parent["logger"] is None


def test_version_prints_dqid_and_exits_0(capsys):
    import dqid

    with pytest.raises(SystemExit) as exited:
        TwistdOptions().parseOptions(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"dqid {dqid.__version__}\n"


def test_an_abbreviated_config_option_is_refused_not_ignored(tmp_path):
    config = config_file(tmp_path, "size = 5\n")
    assert "--config: give the option's whole name" in refused(f"--conf={config}")

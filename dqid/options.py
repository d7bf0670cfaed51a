"""Command-line options of a dqid node (twistd plugin and console script)."""

from __future__ import annotations

import math
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet import endpoints
from twisted.python import usage

from . import __version__
from .config_file import ConfigFileError, config_path, with_config_file
from .logs import JSON_OBSERVER
from .ids import is_valid_node_id, node_id_from_hostname
from .keyfile import KeyFileError, load_cluster_key
from .peer_tls import PeerTLS, PeerTLSError
from .tokens import TokenFileError, TokenSet

DEFAULT_HTTP = "tcp:8080:interface=127.0.0.1"
DEFAULT_AMP = "tcp:8081:interface=127.0.0.1"


@dataclass(frozen=True)
class PeerAddress:
    node_id: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.node_id}={self.host}:{self.port}"


def _coercer(name: str, doc: str, convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def coerce(text: str) -> Any:
        try:
            return convert(text)
        except (ValueError, TypeError):
            raise ValueError(f"{name} must be {doc}, got {text!r}") from None

    coerce.coerceDoc = f"Must be {doc}."  # type: ignore[attr-defined]
    return coerce


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _lease_seconds(text: str) -> float:
    value = float(text)
    if math.isnan(value) or not 0 < value <= 43200:
        raise ValueError(text)
    return value


def _log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise ValueError(text)
    return text


def _node_id(text: str) -> str:
    if not is_valid_node_id(text):
        raise ValueError(text)
    return text


def parse_peer(text: str) -> PeerAddress:
    """``ID=HOST:PORT``; ValueError naming what is wrong."""
    node_id, sep, address = text.partition("=")
    host, colon, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not colon or not host:
        raise ValueError(f"--peer must be ID=HOST:PORT, got {text!r}")
    if not is_valid_node_id(node_id):
        raise ValueError(f"--peer {text!r}: the id must be 1-64 of A-Z a-z 0-9 _ -")
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"--peer {text!r}: the port must be 1-65535")
    return PeerAddress(node_id, host, int(port_text))


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run one dqid node: a bounded work queue with an HTTP API. With "
        "--peer it replicates every message to its peers over AMP before "
        "accepting it; without, it is a standalone in-memory node."
    )

    optParameters = [
        ["size", None, 1000, "Capacity of this node's own queue",
         _coercer("--size", "a whole number >= 1", _positive_int)],
        ["node-id", None, None,
         "This node's name (1-64 of A-Z a-z 0-9 _ -) [default: the host name]",
         _coercer("--node-id", "1-64 of A-Z a-z 0-9 _ -", _node_id)],
        ["http", None, DEFAULT_HTTP, "Server endpoint for the REST API"],
        ["amp", None, DEFAULT_AMP, "Server endpoint for peer replication"],
        ["min-copies", None, None,
         "Copies (owner included) before a push is accepted [default: all nodes]",
         _coercer("--min-copies", "a whole number >= 1", _positive_int)],
        ["visibility", None, 30.0, "Default lease, in seconds",
         _coercer("--visibility", "seconds, 0 < S <= 43200", _lease_seconds)],
        ["max-message-bytes", None, 262144, "Largest message body, in bytes",
         _coercer("--max-message-bytes", "a whole number >= 1", _positive_int)],
        ["data-dir", None, None,
         "Directory of this node's append-only log: every push and ack is on disk "
         "(fsync) before it is answered [default: memory only]"],
        ["max-deliveries", None, 0,
         "Hold a message (never drop it) once it was delivered N times and its lease "
         "ends without an ack; 0: no limit",
         _coercer("--max-deliveries", "a whole number >= 0", _count)],
        ["cluster-key-file", None, None,
         "File holding the key peers prove to each other (mode 0600, >= 16 bytes); "
         "required with --peer"],
        ["peer-tls-cert", None, None, "PEM certificate of this node, for TLS between peers"],
        ["peer-tls-key", None, None, "PEM private key of --peer-tls-cert"],
        ["peer-tls-ca", None, None, "PEM certificate of the CA that signs every peer's"],
        ["http-token-file", None, None,
         "File of bearer tokens for the HTTP API, one per line (re-read on SIGHUP)"],
        ["log-format", None, "text",
         "Log lines: text, or json (one JSON object per line on stdout; under twistd "
         "the same as --logger=dqid.logs.json_observer)",
         _coercer("--log-format", "text or json", _log_format)],
        ["config", None, None,
         "TOML file of options: keys are long option names, peer a list; the "
         "command line wins"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["peers"] = []

    def opt_version(self) -> None:
        """Print dqid's version and exit."""
        print(f"dqid {__version__}")
        raise SystemExit(0)

    def parseOptions(self, options: list[str] | None = None) -> None:
        """Parse ``options`` after the options of their ``--config`` file."""
        args = sys.argv[1:] if options is None else list(options)
        known = {name.rstrip("=") for name in self.longOpt} - {"help", "version"}
        try:
            args = with_config_file(args, known, repeated={"peer"})
        except ConfigFileError as error:
            raise usage.UsageError(str(error)) from None
        super().parseOptions(args)
        if self["config"] is not None and config_path(args) is None:
            # getopt took an abbreviation (--conf=FILE) that was not read.
            raise usage.UsageError("--config: give the option's whole name, --config=FILE")

    def opt_peer(self, value: str) -> None:
        """A peer's id and AMP address, ID=HOST:PORT; repeat per peer."""
        try:
            self["peers"].append(parse_peer(value))
        except ValueError as error:
            raise usage.UsageError(str(error)) from None

    def postOptions(self) -> None:
        if self["node-id"] is None:
            self["node-id"] = node_id_from_hostname(socket.gethostname())
        peer_ids = [peer.node_id for peer in self["peers"]]
        if len(set(peer_ids)) != len(peer_ids):
            raise usage.UsageError("--peer: each peer id may be given once")
        if self["node-id"] in peer_ids:
            raise usage.UsageError(
                f"--peer: {self['node-id']!r} is this node's own id (--node-id)"
            )
        nodes = len(peer_ids) + 1
        if self["min-copies"] is None:
            self["min-copies"] = nodes
        elif self["min-copies"] > nodes:
            raise usage.UsageError(
                f"--min-copies must be at most the number of nodes ({nodes}), "
                f"got {self['min-copies']}"
            )
        for name in ("http", "amp"):
            _check_endpoint(name, self[name])
        self._load_security()
        self._choose_logger()

    def _choose_logger(self) -> None:
        """``--log-format=json`` under twistd (the console script runs
        twistd too): name dqid's JSON observer as twistd's ``--logger``,
        unless one was given there."""
        parent = getattr(self, "parent", None)
        if self["log-format"] == "json" and parent is not None and not parent.get("logger"):
            parent["logger"] = JSON_OBSERVER

    def _load_security(self) -> None:
        """Read the key, certificates and tokens now: a bad file is a
        one-line error at start, never a failure later."""
        path = self["cluster-key-file"]
        if self["peers"] and path is None:
            raise usage.UsageError("--cluster-key-file is required with --peer "
                                   "(peers prove a shared key to each other)")
        self["cluster-key"] = None
        if path is not None and self["peers"]:
            try:
                self["cluster-key"] = load_cluster_key(path)
            except KeyFileError as error:
                raise usage.UsageError(f"--cluster-key-file: {error}") from None
        tls = [self[f"peer-tls-{part}"] for part in ("cert", "key", "ca")]
        self["peer-tls"] = None
        if any(tls):
            if not all(tls):
                raise usage.UsageError(
                    "--peer-tls-cert, --peer-tls-key and --peer-tls-ca go together")
            try:
                self["peer-tls"] = PeerTLS.load(*tls)
            except PeerTLSError as error:
                raise usage.UsageError(str(error)) from None
        self["http-tokens"] = None
        if self["http-token-file"] is not None:
            try:
                self["http-tokens"] = TokenSet(self["http-token-file"])
            except TokenFileError as error:
                raise usage.UsageError(f"--http-token-file: {error}") from None

    def parseArgs(self, *args: str) -> None:
        if args:
            raise usage.UsageError(f"unexpected argument {args[0]!r}")


def _check_endpoint(name: str, description: str) -> None:
    from twisted.internet import reactor

    try:
        endpoints.serverFromString(reactor, description)
    except Exception as error:  # e.g. ssl: without its certificate file (OSError)
        raise usage.UsageError(
            f"--{name}: {description!r} is not a server endpoint ({error})"
        ) from None


class TwistdOptions(Options):
    """Options as twistd parses them: a bad option ends the process with one
    line on stderr and exit code 2, instead of the full usage text."""

    def parseOptions(self, options: list[str] | None = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as error:
            text = str(error).removeprefix("Parameter type enforcement failed: ")
            sys.stderr.write(f"dqid: error: {text} (see --help)\n")
            raise SystemExit(2) from None

"""Service wiring: ``twistd dqid`` and the ``dqid`` script build this."""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from .amp_protocol import PeerAuth, PeerFactory
from .cluster import Cluster
from .datadir import DataDirError, DataDirLocked
from .durability import open_data_dir
from .http_auth import BearerGate
from .httpbody import bounded_site
from .journal import CorruptLog
from .node import QueueNode
from .peers import peer_client
from .timings import DEFAULT_TIMINGS, Timings
from .options import TwistdOptions
from .tokens import TokenFileError
from .web import HttpApi, batch_body_limit

Options = TwistdOptions



class ListenService(Service):
    """Listens on a server endpoint while it runs; a port that cannot be
    bound ends the process.

    It listens in ``privilegedStartService`` (twistd calls it before giving
    up root, so a port below 1024 may be bound).  An endpoint that fails at
    once (tcp:, ssl: and unix: do) ends start-up with one line,
    ``dqid: error: cannot listen for WHAT on 'DESCRIPTION': REASON``; one
    that fails later is logged and stops the reactor.
    """

    log = Logger()

    def __init__(self, what: str, description: str, reactor: Any, factory: Any) -> None:
        self.what = what
        self.description = description
        self.reactor = reactor
        self.endpoint = endpoints.serverFromString(reactor, description)
        self.factory = factory
        # Fires with the listening port (None once listening failed).
        self.listening: Deferred | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failed_at_once: list[Failure] = []
        starting = True

        def not_listening(failure: Failure) -> None:
            if starting:
                failed_at_once.append(failure)
            elif not failure.check(CancelledError):  # not stopped before listening
                self.log.failure(
                    "dqid: cannot listen for {what} on {description}", failure,
                    what=self.what, description=self.description,
                )
                self.reactor.stop()

        self.listening = self.endpoint.listen(self.factory)
        self.listening.addErrback(not_listening)
        starting = False
        for failure in failed_at_once:
            if failure.check(CannotListenError):
                raise SystemExit(
                    f"dqid: error: cannot listen for {self.what} on "
                    f"{self.description!r}: {failure.value.socketError}"
                )
            failure.raiseException()

    def startService(self) -> None:
        super().startService()
        if self.listening is None:  # started without privilegedStartService
            self.privilegedStartService()

    def stopService(self) -> Deferred | None:
        super().stopService()
        listening, self.listening = self.listening, None
        if listening is None:
            return None
        listening.cancel()  # a listen still under way ends here

        def stop(port: IListeningPort | None) -> Deferred | None:
            return None if port is None else port.stopListening()

        return listening.addCallback(stop)


class NodeService(Service):
    """Starts and stops a QueueNode with the process."""

    log = Logger()

    def __init__(self, node: QueueNode, config: Any, reactor: Any,
                 timings: Timings) -> None:
        self.node = node
        self.config = config
        self.reactor = reactor
        self.timings = timings

    def startService(self) -> None:
        super().startService()
        config = self.config
        if config["http-tokens"] is not None:
            signal.signal(signal.SIGHUP, self._hangup)
        self.log.info(
            "dqid node {node} (epoch {epoch}) size={size} http={http} "
            "amp={amp} peers={peers} min_copies={min_copies}",
            node=self.node.node_id, epoch=self.node.epoch, size=config["size"],
            http=config["http"], amp=config["amp"] if config["peers"] else "off",
            peers=",".join(str(p) for p in config["peers"]) or "none",
            min_copies=config["min-copies"],
        )

    def _hangup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload_tokens)

    def reload_tokens(self) -> None:
        """SIGHUP: read --http-token-file again; on an error keep the old tokens."""
        tokens = self.config["http-tokens"]
        try:
            count = tokens.reload()
        except TokenFileError as error:
            self.log.error("kept the HTTP tokens in use: {error}", error=str(error))
            return
        self.log.info("read {count} HTTP token(s) from {path}", count=count,
                      path=str(tokens.path))

    def stopService(self) -> Deferred:
        super().stopService()
        self.node.shutdown()
        self.log.info("dqid node {node} stopping", node=self.node.node_id)
        # Answered long polls get a moment to flush.
        return deferLater(self.reactor, self.timings.shutdown_grace, lambda: None)


class ClusterService(Service):
    """Runs the cluster's heartbeats and recovery with the process."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def startService(self) -> None:
        super().startService()
        self.cluster.start()

    def stopService(self) -> None:
        super().stopService()
        self.cluster.stop()


def makeService(config: Any, reactor: Any = None,
                timings: Timings = DEFAULT_TIMINGS) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    peers = config["peers"]
    node = QueueNode(
        config["node-id"],
        config["size"],
        reactor,
        # A standalone node mints its epoch from the clock; a cluster node
        # learns it from its peers during recovery.
        epoch=0 if peers else int(reactor.seconds() * 1000),
        visibility=config["visibility"],
        idempotency_window=timings.idempotency_window,
        max_deliveries=config["max-deliveries"],
    )
    cluster = Cluster(node, peers, reactor, config["min-copies"], timings) if peers else None
    api = HttpApi(node, config["max-message-bytes"],
                  cluster=cluster.view if cluster is not None else None)
    resource: Any = api.resource()
    if config["http-tokens"] is not None:
        resource = BearerGate(resource, config["http-tokens"])
    site = bounded_site(
        resource,
        max_body=config["max-message-bytes"],
        max_batch_body=batch_body_limit(config["max-message-bytes"]),
    )
    top = MultiService()
    if config["data-dir"] is not None:
        # Before the node: it stops after the node, writing what is asked.
        holdings = cluster.holdings if cluster is not None else None
        try:
            disk = open_data_dir(config["data-dir"], node, holdings, reactor)
        except (DataDirLocked, DataDirError, CorruptLog, OSError) as error:
            raise SystemExit(f"dqid: error: --data-dir: {error}") from None
        disk.setServiceParent(top)
    NodeService(node, config, reactor, timings).setServiceParent(top)
    if cluster is not None:
        ClusterService(cluster).setServiceParent(top)
        auth = PeerAuth(config["cluster-key"], node.node_id,
                        frozenset(p.node_id for p in peers), reactor, timings.call_timeout)
        tls = config["peer-tls"]
        listener: Any = PeerFactory(cluster, auth)
        if tls is not None:
            listener = tls.server_factory(listener)
        ListenService("amp", config["amp"], reactor, listener).setServiceParent(top)
        for peer in peers:
            peer_client(reactor, PeerFactory(cluster, auth, dialled=peer.node_id), peer,
                        timings, tls).setServiceParent(top)
    ListenService("http", config["http"], reactor, site).setServiceParent(top)
    return top

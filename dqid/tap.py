"""Service wiring: ``twistd dqid`` and the ``dqid`` script build this."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.logger import Logger

from .amp_protocol import PeerFactory
from .cluster import Cluster
from .httpbody import bounded_site
from .node import QueueNode
from .peers import peer_client
from .options import TwistdOptions
from .web import HttpApi, batch_body_limit

Options = TwistdOptions

# After SIGTERM, how long open responses (answered long polls) get to flush.
SHUTDOWN_GRACE = 0.2


class ListenService(StreamServerEndpointService):
    """Listens at start-up; a port that cannot be bound ends the process."""

    def __init__(self, what: str, description: str, reactor: Any, factory: Any) -> None:
        super().__init__(endpoints.serverFromString(reactor, description), factory)
        self.what = what
        self.description = description
        self._raiseSynchronously = True

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as error:
            raise SystemExit(
                f"dqid: error: cannot listen for {self.what} on "
                f"{self.description!r}: {error.socketError}"
            ) from None


class NodeService(Service):
    """Starts and stops a QueueNode with the process."""

    log = Logger()

    def __init__(self, node: QueueNode, config: Any, reactor: Any) -> None:
        self.node = node
        self.config = config
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        config = self.config
        self.log.info(
            "dqid node {node} (epoch {epoch}) size={size} http={http} "
            "amp={amp} peers={peers} min_copies={min_copies}",
            node=self.node.node_id, epoch=self.node.epoch, size=config["size"],
            http=config["http"], amp=config["amp"] if config["peers"] else "off",
            peers=",".join(str(p) for p in config["peers"]) or "none",
            min_copies=config["min-copies"],
        )

    def stopService(self) -> Deferred:
        super().stopService()
        self.node.shutdown()
        self.log.info("dqid node {node} stopping", node=self.node.node_id)
        return deferLater(self.reactor, SHUTDOWN_GRACE, lambda: None)


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


def makeService(config: Any, reactor: Any = None) -> MultiService:
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
        min_copies=config["min-copies"],
    )
    api = HttpApi(node, config["max-message-bytes"])
    site = bounded_site(
        api.resource(),
        max_body=config["max-message-bytes"],
        max_batch_body=batch_body_limit(config["max-message-bytes"]),
    )
    top = MultiService()
    NodeService(node, config, reactor).setServiceParent(top)
    if peers:
        cluster = Cluster(node, peers, reactor, config["min-copies"])
        ClusterService(cluster).setServiceParent(top)
        ListenService("amp", config["amp"], reactor, PeerFactory(cluster)).setServiceParent(top)
        for peer in peers:
            peer_client(reactor, cluster, peer).setServiceParent(top)
    ListenService("http", config["http"], reactor, site).setServiceParent(top)
    return top

"""Every node's ``/stats`` in one document (``GET /cluster``).

A load balancer's single address shows whichever node answered; this view
asks every peer over AMP (:class:`~dqid.amp_commands.NodeStats`) and lists
each node as up, with its stats, or down, with why::

    {"node": "a",                     # the node that answered
     "nodes": {"a": {"up": true, "stats": {...}},
               "b": {"up": true, "stats": {...}},
               "c": {"up": false, "error": "not linked"}}}

A peer that has no link, or does not answer within ``timeout`` seconds, is
down; the view never waits longer than that.  A standalone node lists only
itself (:func:`local_view`).
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet.defer import Deferred, TimeoutError, gatherResults, succeed
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from . import amp_commands as cmd
from .links import Links
from .peers import Peer

__all__ = ["ClusterView", "local_view"]


def local_view(node_id: str, stats: dict[str, Any]) -> dict[str, Any]:
    """The document of a node without peers: only itself, up."""
    return {"node": node_id, "nodes": {node_id: {"up": True, "stats": stats}}}


def _down(error: str) -> dict[str, Any]:
    return {"up": False, "error": error}


class ClusterView:
    log = Logger()

    def __init__(self, me: str, stats: Callable[[], dict[str, Any]], links: Links,
                 timeout: float) -> None:
        self.me = me
        self.stats = stats
        self.links = links
        self.timeout = timeout

    def gather(self) -> Deferred:
        """Fires with the document: this node's stats and every peer's, or
        why a peer is down.  Never fails; fires within ``timeout``."""
        names = sorted(self.links.peers)
        asked = [self._ask(self.links.peers[name]) for name in names]

        def made(answers: list[dict[str, Any]]) -> dict[str, Any]:
            nodes = {self.me: {"up": True, "stats": self.stats()}, **dict(zip(names, answers))}
            return {"node": self.me, "nodes": dict(sorted(nodes.items()))}

        return gatherResults(asked).addCallback(made)

    def _ask(self, peer: Peer) -> Deferred:
        link = peer.link()
        if link is None:
            return succeed(_down("not linked"))
        d = self.links.call(link, cmd.NodeStats, timeout=self.timeout)
        return d.addCallbacks(self._answered, self._failed, errbackArgs=(peer,))

    @staticmethod
    def _answered(answer: dict[str, Any]) -> dict[str, Any]:
        try:
            stats = json.loads(answer["stats"])
        except (ValueError, UnicodeDecodeError, RecursionError):
            stats = None
        if not isinstance(stats, dict):
            return _down("its answer is not a stats document")
        return {"up": True, "stats": stats}

    def _failed(self, failure: Failure, peer: Peer) -> dict[str, Any]:
        if failure.check(TimeoutError):
            error = f"no answer within {self.timeout:g} s"
        elif failure.check(amp.UnhandledCommand):
            error = "it does not answer NodeStats (an older dqid?)"
        else:
            error = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        self.log.debug("stats of {peer} not had: {error}", peer=peer.node_id, error=error)
        return _down(error)

    def on_node_stats(self) -> bytes:
        """A peer asks for this node's stats (the NodeStats responder)."""
        return json.dumps(self.stats(), separators=(",", ":")).encode("utf-8")

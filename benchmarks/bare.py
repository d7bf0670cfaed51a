"""The bare twisted.web baseline server: ``python bare.py PORT``.

``POST /push`` appends the body to a deque and answers ``201 {"id": ...}``;
``GET /get`` pops one (or answers 204); ``GET /ready`` answers 200.  No
access log, like dqid: the ceiling of the framework dqid is built on.
"""

from __future__ import annotations

import collections
import itertools
import sys

from twisted.internet import reactor
from twisted.web import resource, server


def site() -> server.Site:
    queue: collections.deque[bytes] = collections.deque()
    ids = itertools.count(1)

    class Push(resource.Resource):
        isLeaf = True

        def render_POST(self, request):
            body = request.content.read()
            queue.append(body)
            request.setResponseCode(201)
            request.setHeader(b"Content-Type", b"application/json")
            return b'{"id":"%d"}' % next(ids)

    class Get(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            if not queue:
                request.setResponseCode(204)
                return b""
            request.setHeader(b"Content-Type", b"application/octet-stream")
            return queue.popleft()

    class Ready(resource.Resource):
        isLeaf = True

        def render_GET(self, request):
            return b'{"status":"ready"}'

    class QuietSite(server.Site):
        def log(self, request):  # no access log, like dqid
            pass

    root = resource.Resource()
    root.putChild(b"push", Push())
    root.putChild(b"get", Get())
    root.putChild(b"ready", Ready())
    quiet = QuietSite(root)
    quiet.displayTracebacks = False
    return quiet


def serve(port: int) -> None:
    reactor.listenTCP(port, site(), interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    serve(int(sys.argv[1]))

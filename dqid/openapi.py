"""The OpenAPI 3 document of the HTTP API (``GET /openapi.json``).

The document is ``dqid/openapi.json`` in the package, the same file as in
the repository: served as its bytes, read once.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

__all__ = ["openapi_document"]


@cache
def openapi_document() -> bytes:
    """The bytes of ``dqid/openapi.json``."""
    return files(__package__).joinpath("openapi.json").read_bytes()

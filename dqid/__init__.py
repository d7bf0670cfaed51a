"""dqid: a bounded, replicated work queue daemon on Twisted."""

from importlib.metadata import PackageNotFoundError, version as _installed_version


def _version() -> str:
    """The version of the installed package (pyproject.toml is the one place
    it is written); "0+unknown" when dqid runs from a tree not installed."""
    try:
        return _installed_version("dqid")
    except PackageNotFoundError:
        return "0+unknown"


__version__ = _version()

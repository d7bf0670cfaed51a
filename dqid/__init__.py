"""dqid: a bounded, replicated work queue daemon on Twisted."""

__version__ = "0.1.0"

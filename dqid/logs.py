"""Log observers for ``--log-format``.

``json_observer`` writes each event as one JSON object per line on stdout
(:func:`twisted.logger.eventAsJSON`: the event's named fields, such as
``node``, ``peer``, ``epoch`` and ``id``, with ``log_format``,
``log_level``, ``log_namespace`` and ``log_time``).  twistd takes it by
name: ``twistd --logger=dqid.logs.json_observer dqid ...``; the
``dqid --log-format=json`` option names it for twistd.
"""

from __future__ import annotations

import sys

from twisted.logger import FileLogObserver, jsonFileLogObserver

__all__ = ["JSON_OBSERVER", "json_observer"]

# The dotted name twistd's --logger takes.
JSON_OBSERVER = "dqid.logs.json_observer"


def json_observer() -> FileLogObserver:
    """One JSON object per line on stdout (no record separator)."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")

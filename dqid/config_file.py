"""``--config FILE``: options of a node from a TOML file.

The file's keys are the long option names (``size``, ``node-id``,
``cluster-key-file``, ...), ``peer`` is a list of ``ID=HOST:PORT``::

    node-id = "n1"
    http = "tcp:8081:interface=127.0.0.1"
    peer = ["n2=127.0.0.1:8182", "n3=127.0.0.1:8183"]
    cluster-key-file = "/etc/dqid/cluster.key"

The file becomes command-line arguments put before the real ones, so the
usual checks apply to every value and the command line wins: a later
``--size`` replaces the file's, and any ``--peer`` on the command line
replaces the file's whole list.  A file that cannot be read, is not TOML,
or names an unknown option is a :class:`ConfigFileError`.
"""

from __future__ import annotations

import tomllib
from typing import Any, Collection, Sequence

__all__ = ["ConfigFileError", "config_path", "config_arguments", "with_config_file"]

OPTION = "config"


class ConfigFileError(Exception):
    """The config file cannot be used; the message says why, in one line."""


def config_path(args: Sequence[str]) -> str | None:
    """The FILE of the last ``--config FILE`` or ``--config=FILE`` in
    ``args`` (up to a bare ``--``), or None."""
    path = None
    flag = f"--{OPTION}"
    for index, arg in enumerate(args):
        if arg == "--":
            break
        if arg.startswith(flag + "="):
            path = arg[len(flag) + 1:]
        elif arg == flag and index + 1 < len(args):
            path = args[index + 1]
    return path


def _load(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as error:
        raise ConfigFileError(f"cannot read it: {error.strerror or error}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigFileError(f"not TOML: {error}") from None


def _text(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigFileError(
            f"{key}: must be a string or a number, got {type(value).__name__}")
    return str(value)


def config_arguments(table: dict[str, Any], known: Collection[str],
                     repeated: Collection[str]) -> list[str]:
    """``table`` as arguments ``--KEY=VALUE``; ``repeated`` keys (``peer``)
    hold a list and give one argument per item."""
    arguments = []
    for key, value in table.items():
        if key == OPTION:
            raise ConfigFileError("a config file cannot name another (config)")
        if key not in known:
            hint = " (option names use -, not _)" if key.replace("_", "-") in known else ""
            raise ConfigFileError(f"unknown option {key!r}{hint}")
        if key in repeated:
            items = value if isinstance(value, list) else [value]
            arguments += [f"--{key}={_text(key, item)}" for item in items]
        else:
            arguments.append(f"--{key}={_text(key, value)}")
    return arguments


def with_config_file(args: Sequence[str], known: Collection[str],
                     repeated: Collection[str]) -> list[str]:
    """``args`` with the options of its ``--config`` file put first (the
    command line wins); ``args`` as they are without ``--config``."""
    path = config_path(args)
    if path is None:
        return list(args)
    try:
        from_file = config_arguments(_load(path), known, repeated)
    except ConfigFileError as error:
        raise ConfigFileError(f"--config {path}: {error}") from None
    on_command_line = {name for name in repeated
                       if any(a == f"--{name}" or a.startswith(f"--{name}=") for a in args)}
    from_file = [a for a in from_file
                 if a.split("=", 1)[0].removeprefix("--") not in on_command_line]
    return [*from_file, *args]

"""The cluster key file: the shared secret every peer proves it knows.

``--cluster-key-file PATH`` is read once at start.  Anything wrong with the
file stops the start with one line naming the file and the problem, so
:func:`load_cluster_key` raises :class:`KeyFileError` with exactly that line.
"""

from __future__ import annotations

import errno
import os
import stat

MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 64 * 1024  # a key, not a data file: a start never reads more


class KeyFileError(Exception):
    """The cluster key file cannot be used; ``str()`` is one line for the operator."""


def _shown(path: str | os.PathLike[str]) -> str:
    """The path as it goes into a one-line message."""
    text = os.fsdecode(path)
    return text if text.isprintable() else repr(text)


def load_cluster_key(path: str | os.PathLike[str]) -> bytes:
    """The key held in ``path``, without its trailing newline or whitespace.

    Refused, with :class:`KeyFileError`: a file that is missing, not a
    regular file, unreadable, empty, shorter than :data:`MIN_KEY_BYTES`,
    longer than :data:`MAX_KEY_BYTES`, or that the group or others may
    access (``mode & 0o077``).
    """
    shown = _shown(path)

    def refuse(problem: str) -> KeyFileError:
        return KeyFileError(f"cluster key file {shown}: {problem}")

    try:
        # O_NONBLOCK: a FIFO in the key's place must not hang the start.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise refuse("no such file") from None
    except PermissionError:
        raise refuse("not readable (permission denied)") from None
    except OSError as error:
        reason = error.strerror or errno.errorcode.get(error.errno or 0, "error")
        raise refuse(f"cannot open: {reason}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise refuse("not a regular file")
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise refuse(f"open to group or others (mode {mode:04o}); chmod 600 it")
        raw = b""
        try:
            while len(raw) <= MAX_KEY_BYTES:
                part = os.read(fd, MAX_KEY_BYTES + 1 - len(raw))
                if not part:
                    break
                raw += part
        except OSError as error:
            raise refuse(f"cannot read: {error.strerror or 'error'}") from None
    finally:
        os.close(fd)
    if len(raw) > MAX_KEY_BYTES:
        raise refuse(f"longer than {MAX_KEY_BYTES} bytes; is it the right file?")
    key = raw.rstrip()
    if not key:
        raise refuse("empty")
    if len(key) < MIN_KEY_BYTES:
        raise refuse(f"key is {len(key)} bytes, shorter than {MIN_KEY_BYTES}")
    return key

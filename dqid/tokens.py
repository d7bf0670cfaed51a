"""Bearer tokens for the HTTP API (``--http-token-file``).

The file holds one token per line; blank lines and lines starting with
``#`` are ignored, and whitespace around a token is stripped.  A token is
printable ASCII without spaces (what fits in ``Authorization: Bearer ...``);
anything else is an error naming the line, never the token.

Only SHA-256 digests of the tokens are kept, and :meth:`TokenSet.check`
compares the digest of what a client sent with every one of them in
constant time, so neither which token matched, nor how much of one, nor a
token's length shows in the time an answer takes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat

MAX_FILE_BYTES = 1024 * 1024
_BEARER = b"bearer"


class TokenFileError(Exception):
    """The token file cannot be used; ``str()`` is one line for the operator."""


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def _is_token(token: bytes) -> bool:
    return all(0x21 <= byte <= 0x7E for byte in token)


def parse_tokens(data: bytes) -> list[bytes]:
    """The tokens in a token file's bytes; ValueError naming the first bad line."""
    tokens = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        token = line.strip()
        if not token or token.startswith(b"#"):
            continue
        if not _is_token(token):
            raise ValueError(
                f"line {number}: a token is printable ASCII without spaces "
                "(comments go on their own line, starting with #)")
        tokens.append(token)
    if not tokens:
        raise ValueError("no token in the file")
    return tokens


def _shown(path: str | os.PathLike[str]) -> str:
    text = os.fsdecode(path)
    return text if text.isprintable() else repr(text)


def read_token_file(path: str | os.PathLike[str]) -> list[bytes]:
    """The tokens in ``path``; :class:`TokenFileError` (one line) if there are none."""
    shown = _shown(path)
    try:
        # O_NONBLOCK: a FIFO must not hang the start or a SIGHUP reload.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise TokenFileError(f"token file {shown}: no such file") from None
    except OSError as error:
        raise TokenFileError(
            f"token file {shown}: cannot open: {error.strerror or 'error'}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TokenFileError(f"token file {shown}: not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as error:
        raise TokenFileError(
            f"token file {shown}: cannot read: {error.strerror or 'error'}") from None
    finally:
        os.close(fd)
    if size > MAX_FILE_BYTES:
        raise TokenFileError(f"token file {shown}: longer than {MAX_FILE_BYTES} bytes")
    try:
        return parse_tokens(b"".join(chunks))
    except ValueError as error:
        raise TokenFileError(f"token file {shown}: {error}") from None


def bearer_credentials(header_value: bytes | None) -> bytes | None:
    """The token in an ``Authorization: Bearer TOKEN`` value, or None.

    The scheme is case-insensitive (RFC 7235); one or more spaces follow it.
    """
    if not header_value:
        return None
    scheme, _, rest = header_value.strip().partition(b" ")
    if scheme.lower() != _BEARER:
        return None
    token = rest.strip(b" ")
    return token or None


class TokenSet:
    """The accepted tokens, read from ``path`` now and on every :meth:`reload`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        self._digests: tuple[bytes, ...] = ()
        self.reload()

    def __len__(self) -> int:
        return len(self._digests)

    def reload(self) -> int:
        """Read the file again (on SIGHUP); how many tokens it now holds.

        On any error the tokens in use stay as they were and
        :class:`TokenFileError` says why, in one line.
        """
        tokens = read_token_file(self.path)
        self._digests = tuple(dict.fromkeys(_digest(t) for t in tokens))
        return len(self._digests)

    def check(self, header_value: bytes | None) -> bool:
        """True if ``header_value`` is ``Bearer T`` for one of the tokens.

        Every token is compared, whatever matched before it.
        """
        if isinstance(header_value, str):
            try:
                header_value = header_value.encode("latin-1")
            except UnicodeEncodeError:
                return False
        sent = bearer_credentials(header_value)
        candidate = _digest(sent if sent is not None else b"")
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched and sent is not None

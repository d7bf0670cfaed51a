"""HTTP bearer tokens (dqid.tokens).

DESIGN.md, Security: ``--http-token-file PATH``, one token per line (``#``
comments and blank lines ignored), re-read on SIGHUP; requests need
``Authorization: Bearer TOKEN``; tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqid import tokens as tokens_module
from dqid.tokens import (
    MAX_FILE_BYTES,
    TokenFileError,
    TokenSet,
    bearer_credentials,
    parse_tokens,
)

FILE = b"""\
# workers
worker-token-1

   ops-token-2   \r
#disabled-token
"""


def token_file(tmp_path, content: bytes, name: str = "tokens"):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def one_line_error(path) -> str:
    with pytest.raises(TokenFileError) as caught:
        TokenSet(path)
    message = str(caught.value)
    assert "\n" not in message and os.fspath(path) in message
    return message


def test_parse_ignores_comments_blank_lines_and_surrounding_whitespace():
    assert parse_tokens(FILE) == [b"worker-token-1", b"ops-token-2"]


def test_file_tokens_are_accepted_and_nothing_else(tmp_path):
    tokens = TokenSet(token_file(tmp_path, FILE))
    assert len(tokens) == 2
    assert tokens.check(b"Bearer worker-token-1")
    assert tokens.check(b"Bearer ops-token-2")
    for refused in (None, b"", b"Bearer", b"Bearer ", b"Bearer #disabled-token",
                    b"Bearer disabled-token", b"Bearer # workers", b"Bearer worker-token",
                    b"Bearer worker-token-12", b"Basic worker-token-1", b"worker-token-1",
                    b"Bearerworker-token-1", b"Bearer worker-token-1 ops-token-2",
                    b"Bearer WORKER-TOKEN-1"):
        assert not tokens.check(refused), refused


def test_scheme_is_case_insensitive_and_spacing_tolerated(tmp_path):
    tokens = TokenSet(token_file(tmp_path, FILE))
    for value in (b"bearer worker-token-1", b"BEARER worker-token-1",
                  b"Bearer   worker-token-1", b" Bearer worker-token-1 "):
        assert tokens.check(value), value


def test_str_header_values_are_accepted_too(tmp_path):
    tokens = TokenSet(token_file(tmp_path, FILE))
    assert tokens.check("Bearer ops-token-2")
    assert not tokens.check("Bearer ops-token-2\u20ac")


def test_bearer_credentials():
    assert bearer_credentials(b"Bearer abc") == b"abc"
    assert bearer_credentials(b"Bearer  abc ") == b"abc"
    assert bearer_credentials(b"Bearer") is None
    assert bearer_credentials(b"Token abc") is None
    assert bearer_credentials(None) is None


def test_missing_file(tmp_path):
    assert "no such file" in one_line_error(tmp_path / "nope")


@pytest.mark.parametrize("content", [b"", b"\n\n", b"# only a comment\n  # another\n"])
def test_a_file_without_tokens_is_an_error(tmp_path, content):
    assert "no token" in one_line_error(token_file(tmp_path, content))


@pytest.mark.parametrize("bad", [b" words", b"\tinside", b" # comment",
                                 b"caf\xc3\xa9", b"\x00nul", b"\x7f"])
def test_a_line_that_is_not_a_token_is_named_not_shown(tmp_path, bad):
    message = one_line_error(token_file(tmp_path, b"good-token\n# c\nS3CR3T" + bad + b"\n"))
    assert "line 3" in message
    assert "S3CR3T" not in message


def test_directory_and_fifo_are_refused_without_hanging(tmp_path):
    assert "not a regular file" in one_line_error(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in one_line_error(fifo)


def test_huge_file_is_refused(tmp_path):
    path = token_file(tmp_path, b"t" * (MAX_FILE_BYTES + 1))
    assert "longer than" in one_line_error(path)


def test_reload_picks_up_new_and_removed_tokens(tmp_path):
    path = token_file(tmp_path, b"old-token\nkept-token\n")
    tokens = TokenSet(path)
    assert tokens.check(b"Bearer old-token")
    path.write_bytes(b"kept-token\nnew-token\n# old-token\n")
    assert tokens.reload() == 2
    assert not tokens.check(b"Bearer old-token")
    assert tokens.check(b"Bearer new-token") and tokens.check(b"Bearer kept-token")


@pytest.mark.parametrize("breakage", ["empty", "bad line", "removed", "directory"])
def test_failed_reload_keeps_the_old_tokens(tmp_path, breakage):
    path = token_file(tmp_path, b"old-token\n")
    tokens = TokenSet(path)
    if breakage == "empty":
        path.write_bytes(b"# nothing\n")
    elif breakage == "bad line":
        path.write_bytes(b"new-token\nnew token\n")
    elif breakage == "removed":
        path.unlink()
    else:
        path.unlink()
        path.mkdir()
    with pytest.raises(TokenFileError) as caught:
        tokens.reload()
    assert "\n" not in str(caught.value)
    assert tokens.check(b"Bearer old-token")
    assert not tokens.check(b"Bearer new-token")
    assert len(tokens) == 1


def test_duplicate_tokens_count_once(tmp_path):
    assert len(TokenSet(token_file(tmp_path, b"same-token\nsame-token\n"))) == 1


def test_every_token_is_compared_even_after_a_match(tmp_path, monkeypatch):
    """No early exit: the time does not tell which token matched."""
    lines = b"".join(b"token-%d\n" % i for i in range(10))
    tokens = TokenSet(token_file(tmp_path, lines))
    calls = []
    real = hmac.compare_digest

    def counting(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(tokens_module.hmac, "compare_digest", counting)
    for value in (b"Bearer token-0", b"Bearer token-9", b"Bearer nope", None, b"Basic x"):
        calls.clear()
        tokens.check(value)
        # Every token, and always equal-length digests: no length leaks either.
        assert calls == [(32, 32)] * 10, value


token_text = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E),
                     min_size=1, max_size=40).filter(lambda t: not t.startswith("#"))


@settings(max_examples=100, deadline=None)
@given(st.lists(token_text, min_size=1, max_size=8), token_text)
def test_exactly_the_listed_tokens_pass(tmp_path_factory, listed, other):
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text("\n".join(f"  {t}  " for t in listed) + "\n")
    tokens = TokenSet(path)
    for token in listed:
        assert tokens.check(f"Bearer {token}".encode())
    assert tokens.check(f"Bearer {other}".encode()) == (other in listed)

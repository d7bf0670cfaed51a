"""The cluster key file (dqid.keyfile).

DESIGN.md, Security: a missing, empty, shorter than 16 bytes, or
group/world-readable key file stops the start with one line.  Each refusal
here is checked for that: one line, naming the file and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dqid import keyfile
from dqid.keyfile import MAX_KEY_BYTES, MIN_KEY_BYTES, KeyFileError, load_cluster_key

GOOD_KEY = b"0123456789abcdef0123456789abcdef"


def write_key(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


def refusal(path) -> str:
    with pytest.raises(KeyFileError) as caught:
        load_cluster_key(path)
    message = str(caught.value)
    assert "\n" not in message and "\r" not in message
    assert os.fspath(path) in message
    return message


def test_good_key_is_returned_without_trailing_newline(tmp_path):
    path = write_key(tmp_path / "key", GOOD_KEY + b"\n")
    assert load_cluster_key(path) == GOOD_KEY
    assert load_cluster_key(str(path)) == GOOD_KEY


def test_trailing_whitespace_is_not_part_of_the_key(tmp_path):
    """An editor's newline or a stray blank must not split a cluster."""
    a = write_key(tmp_path / "a", GOOD_KEY)
    b = write_key(tmp_path / "b", GOOD_KEY + b" \t\r\n\n")
    assert load_cluster_key(a) == load_cluster_key(b) == GOOD_KEY


def test_binary_key_is_kept_as_is(tmp_path):
    key = bytes(range(256))[::-1]  # ends in 0x00, not whitespace
    assert load_cluster_key(write_key(tmp_path / "key", key)) == key


def test_owner_only_modes_are_accepted(tmp_path):
    for mode in (0o400, 0o600, 0o700):
        path = write_key(tmp_path / f"key{mode:o}", GOOD_KEY, mode)
        assert load_cluster_key(path) == GOOD_KEY


def test_missing_file(tmp_path):
    assert "no such file" in refusal(tmp_path / "nope")


@pytest.mark.parametrize("content", [b"", b"\n", b"   \n\t\n"])
def test_empty_file(tmp_path, content):
    assert refusal(write_key(tmp_path / "key", content)).endswith(": empty")


@pytest.mark.parametrize("length", [1, MIN_KEY_BYTES - 1])
def test_short_key(tmp_path, length):
    message = refusal(write_key(tmp_path / "key", b"k" * length + b"\n"))
    assert f"{length} bytes" in message and f"shorter than {MIN_KEY_BYTES}" in message


def test_exactly_minimum_length_is_accepted(tmp_path):
    key = b"k" * MIN_KEY_BYTES
    assert load_cluster_key(write_key(tmp_path / "key", key + b"\n")) == key


def test_short_after_stripping_is_short(tmp_path):
    # 15 bytes of key padded to 20 with trailing blanks is still too short.
    message = refusal(write_key(tmp_path / "key", b"k" * 15 + b"     "))
    assert "15 bytes" in message


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666, 0o610, 0o601, 0o620])
def test_group_or_world_access_is_refused(tmp_path, mode):
    message = refusal(write_key(tmp_path / "key", GOOD_KEY, mode))
    assert f"{mode:04o}" in message and "chmod 600" in message


def test_mode_checked_before_the_key_is_judged(tmp_path):
    """A world-readable key is refused even when it is otherwise fine."""
    assert "group or others" in refusal(write_key(tmp_path / "key", GOOD_KEY, 0o644))


def test_unreadable_file(tmp_path, monkeypatch):
    path = write_key(tmp_path / "key", GOOD_KEY)
    real_open = os.open

    def deny(name, *args, **kw):
        if os.fspath(name) == os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(name))
        return real_open(name, *args, **kw)

    monkeypatch.setattr(keyfile.os, "open", deny)
    assert "not readable" in refusal(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_by_mode(tmp_path):
    path = write_key(tmp_path / "key", GOOD_KEY, 0o000)
    assert "not readable" in refusal(path)


def test_directory_is_refused(tmp_path):
    directory = tmp_path / "keydir"
    directory.mkdir(mode=0o700)
    assert "not a regular file" in refusal(directory)


def test_fifo_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "key"
    os.mkfifo(fifo, 0o600)
    assert "not a regular file" in refusal(fifo)


def test_huge_file_is_refused(tmp_path):
    path = write_key(tmp_path / "key", b"k" * (MAX_KEY_BYTES + 1))
    assert f"longer than {MAX_KEY_BYTES}" in refusal(path)
    assert load_cluster_key(write_key(tmp_path / "max", b"k" * MAX_KEY_BYTES)) == (
        b"k" * MAX_KEY_BYTES)


def test_symlink_to_a_good_key_is_followed(tmp_path):
    target = write_key(tmp_path / "real", GOOD_KEY)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert load_cluster_key(link) == GOOD_KEY


def test_path_with_a_newline_stays_one_line(tmp_path):
    path = tmp_path / "bad\nname"
    with pytest.raises(KeyFileError) as caught:
        load_cluster_key(path)
    assert "\n" not in str(caught.value)

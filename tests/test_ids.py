"""Unit tests of node ids and message ids (dqid.ids).

DESIGN.md: ``--node-id`` is 1-64 of ``A-Z a-z 0-9 _ -`` (the default host name
is cut to fit); message ids are URL-safe, name their owner node and are never
reused (an epoch in the id).
"""

from __future__ import annotations

import string
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dqid.ids import (
    MessageId,
    consecutive_ids,
    format_id,
    id_prefix,
    is_valid_node_id,
    node_id_from_hostname,
    parse_id,
    parse_ids,
    to_base36,
)

NODE_CHARS = string.ascii_letters + string.digits + "_-"
node_ids = st.text(alphabet=NODE_CHARS, min_size=1, max_size=64)
numbers = st.integers(min_value=0, max_value=2**64 - 1)


# -- node ids -------------------------------------------------------------------


@pytest.mark.parametrize("node_id", ["a", "node-1", "Node_2", "0", "_", "-", "x" * 64])
def test_valid_node_ids(node_id):
    assert is_valid_node_id(node_id)


@pytest.mark.parametrize(
    "node_id",
    ["", "x" * 65, "a.b", "a b", "a/b", "a:b", "a%20", "é", "a\n", "\na", "a\x00", "٣"],
)
def test_invalid_node_ids(node_id):
    assert not is_valid_node_id(node_id)


@pytest.mark.parametrize(
    ("hostname", "node_id"),
    [
        ("worker1", "worker1"),
        ("web-1.example.com", "web-1"),
        ("my host!", "my-host"),
        ("héllo", "h-llo"),
        ("under_score", "under_score"),
        ("-edge-", "edge"),
        ("", "dqid"),
        (".example.com", "dqid"),
        ("!!!", "dqid"),
    ],
)
def test_node_id_from_hostname(hostname, node_id):
    assert node_id_from_hostname(hostname) == node_id


def test_node_id_from_a_long_hostname_is_cut_to_64():
    assert node_id_from_hostname("a" * 100) == "a" * 64
    assert node_id_from_hostname("b" * 64 + ".example.com") == "b" * 64


@given(st.text(max_size=200))
def test_node_id_from_any_hostname_is_a_valid_node_id(hostname):
    node_id = node_id_from_hostname(hostname)
    assert is_valid_node_id(node_id)
    assert 1 <= len(node_id) <= 64


@given(node_ids.filter(lambda n: n.strip("-") == n))
def test_a_hostname_that_is_a_valid_node_id_is_kept(hostname):
    assert node_id_from_hostname(hostname) == hostname


# -- base 36 --------------------------------------------------------------------


@pytest.mark.parametrize(("number", "text"), [(0, "0"), (9, "9"), (10, "a"), (35, "z"), (36, "10"),
                                              (36**2 + 1, "101")])
def test_to_base36(number, text):
    assert to_base36(number) == text


@given(numbers)
def test_to_base36_agrees_with_int(number):
    assert int(to_base36(number), 36) == number


def test_to_base36_refuses_negative_numbers():
    with pytest.raises(ValueError):
        to_base36(-1)


# -- message ids ------------------------------------------------------------------


def test_format_id_layout():
    assert format_id("node-1", 0, 1) == "node-1.0.1"
    assert format_id("n", 36, 35) == "n.10.z"


@given(node_ids, numbers, numbers)
def test_format_then_parse_round_trips(node, epoch, seq):
    text = format_id(node, epoch, seq)
    parsed = parse_id(text)
    assert parsed == MessageId(node, epoch, seq)
    assert (parsed.node, parsed.epoch, parsed.seq) == (node, epoch, seq)
    assert str(parsed) == text


@given(node_ids, numbers, numbers)
def test_message_ids_are_url_safe(node, epoch, seq):
    text = format_id(node, epoch, seq)
    assert quote(text, safe="") == text


@given(st.tuples(node_ids, numbers, numbers), st.tuples(node_ids, numbers, numbers))
def test_distinct_node_epoch_or_seq_give_distinct_ids(a, b):
    """A new epoch (a replacement node) never mints an id used before."""
    assert (format_id(*a) == format_id(*b)) == (a == b)


def test_a_new_epoch_changes_every_id():
    old = {format_id("n", 1, seq) for seq in range(1, 1000)}
    new = {format_id("n", 2, seq) for seq in range(1, 1000)}
    assert not old & new


@pytest.mark.parametrize(
    "text",
    [
        "",
        "n",
        "n.1",
        ".1.1",
        "n..1",
        "n.1.",
        "n.1.1.",
        "a.b.1.1",  # a node id has no dot
        "n.A.1",  # base 36 is lower case
        "n.1.Z",
        "n.-1.1",
        "n.+1.1",
        "n. 1.1",
        "n.1.1 ",
        "n.1.1\n",
        "n.1_0.1",
        "n.1.1/x",
        "n/x.1.1",
        "x" * 65 + ".1.1",
        "n." + "1" * 14 + ".1",  # more digits than any 64-bit number needs
        "n.1.%31",
        "é.1.1",
    ],
)
def test_parse_rejects_malformed_ids(text):
    with pytest.raises(ValueError):
        parse_id(text)


@pytest.mark.parametrize("text", ["n.01.1", "n.1.01", "n.00.0", "n.0.00"])
def test_parse_rejects_ids_dqid_would_not_mint(text):
    """Leading zeros: one message must have exactly one id.

    Otherwise ``n.01.1`` would name the message ``n.1.1`` (for example to a
    tombstone keyed by owner, epoch and seq) without being equal to its id.
    """
    with pytest.raises(ValueError):
        parse_id(text)


def test_parse_accepts_zero():
    assert parse_id("n.0.0") == MessageId("n", 0, 0)


def test_parse_takes_the_node_from_a_hyphenated_id():
    assert parse_id("node-a_1.z.10") == MessageId("node-a_1", 35, 36)


@given(node_ids, numbers, numbers)
def test_an_id_is_its_prefix_and_its_seq(node, epoch, seq):
    assert id_prefix(node, epoch) + to_base36(seq) == format_id(node, epoch, seq)


def parsed_or_none(text: str) -> MessageId | None:
    try:
        return parse_id(text)
    except ValueError:
        return None


# Texts near ids: ids, heads of ids (good and bad) followed by anything, and any text.
id_texts = st.one_of(
    st.builds(format_id, node_ids, numbers, numbers),
    st.builds(lambda a, b: a + b, st.sampled_from(["n.1.", "n.0.", "n.01.", "a.b.", ".1.", "n.1"]),
              st.text(alphabet=string.digits + "abcxyzAZ_-.+ é", max_size=15)),
    st.text(max_size=20),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(id_texts, max_size=30))
def test_parse_ids_reads_a_batch_as_parse_id_reads_each(texts):
    """A batch (an ack's ids, many sharing a head) parses exactly as each
    id alone: the same ids, and None for every text parse_id refuses."""
    assert parse_ids(texts) == [parsed_or_none(text) for text in texts]


@pytest.mark.parametrize("text", ["n.01.1", "n.1.01", "n.1.Z", "n.1.1 ", "a.b.1.1", "n.1.", ""])
def test_parse_ids_refuses_what_parse_id_refuses_beside_a_good_id(text):
    assert parse_ids(["n.1.1", text, "n.1.2"]) == [
        MessageId("n", 1, 1), None, MessageId("n", 1, 2)]


@settings(max_examples=200, deadline=None)
@given(first=st.one_of(st.integers(0, 3000), st.integers(0, 36**13 - 5000)),
       count=st.integers(0, 3000))
def test_consecutive_ids_are_the_ids_of_consecutive_seqs(first, count):
    assert consecutive_ids("n.1.", first, count) == [
        "n.1." + to_base36(seq) for seq in range(first, first + count)]

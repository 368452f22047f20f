"""The pgoutput decoder on messages captured from PostgreSQL 15.18 (no server needed).

The payloads below are what a walsender sent for this session (`proto_version '1'`, with
`messages 'true'`), recorded once from a real server:

    CREATE TYPE mood AS ENUM ('sad', 'happy');
    CREATE TABLE t (id int PRIMARY KEY, name text, big text, m mood, price numeric(10,2));
    ALTER TABLE t ALTER COLUMN big SET STORAGE EXTERNAL;   -- big values are TOASTed
    INSERT INTO t VALUES (1, 'a', repeat('x', 5000), 'happy', 1.50), (2, NULL, NULL, NULL, NULL);
    UPDATE t SET name = 'b' WHERE id = 1;                  -- big unchanged: sent as 'u'
    UPDATE t SET id = 3 WHERE id = 2;                      -- a key change: old key 'K'
    DELETE FROM t WHERE id = 3;
    ALTER TABLE t REPLICA IDENTITY FULL;
    UPDATE t SET name = 'c' WHERE id = 1;                  -- old row 'O', big inline there
    DELETE FROM t WHERE id = 1;
    -- one transaction replayed from replication origin 'origin1' (0/ABCDEF): INSERT id 9
    TRUNCATE t;
    SELECT pg_logical_emit_message(true, 'pfx', 'hello');

`<xN>` stands for N bytes 'x' (the TOASTed value), to keep the lines short.
"""

from __future__ import annotations

import re

import pytest

from pipeline.extract import pgoutput
from pipeline.extract.pgoutput import (
    UNCHANGED,
    Begin,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    ProtocolError,
    Relation,
    Truncate,
    Type,
    Update,
)

CAPTURED = [
    "420000000001d8e7e800030496418f0a3c000002e5",  # B
    "59000040077075626c6963006d6f6f6400",  # Y
    (
        "520000400b7075626c69630074006400050169640000000017ffffffff006e616d650000000019ff"
        "ffffff006269670000000019ffffffff006d0000004007ffffffff00707269636500000006a4000a"
        "0006"
    ),  # R
    (
        "490000400b4e00057400000001317400000001617400001388<x5000>74000000056861707079740"
        "0000004312e3530"
    ),  # I
    "490000400b4e00057400000001326e6e6e6e",  # I
    "43000000000001d8e7e80000000001d8e81800030496418f0a3c",  # C
    "420000000001d8e8b800030496418f0c8c000002e6",  # B
    "550000400b4e000574000000013174000000016275740000000568617070797400000004312e3530",  # U
    "43000000000001d8e8b80000000001d8e8e800030496418f0c8c",  # C
    "420000000001d8e97800030496418f0d80000002e7",  # B
    "550000400b4b00057400000001326e6e6e6e4e00057400000001336e6e6e6e",  # U
    "43000000000001d8e9780000000001d8e9a800030496418f0d80",  # C
    "420000000001d8e9e800030496418f0e44000002e8",  # B
    "440000400b4b00057400000001336e6e6e6e",  # D
    "43000000000001d8e9e80000000001d8ea1800030496418f0e44",  # C
    "420000000001d9003000030496418f1019000002ea",  # B
    "59000040077075626c6963006d6f6f6400",  # Y
    (
        "520000400b7075626c69630074006600050169640000000017ffffffff016e616d650000000019ff"
        "ffffff016269670000000019ffffffff016d0000004007ffffffff01707269636500000006a4000a"
        "0006"
    ),  # R
    (
        "550000400b4f00057400000001317400000001627400001388<x5000>74000000056861707079740"
        "0000004312e35304e000574000000013174000000016375740000000568617070797400000004312"
        "e3530"
    ),  # U
    "43000000000001d900300000000001d9006000030496418f1019",  # C
    "420000000001d914e800030496418f10ff000002eb",  # B
    (
        "440000400b4f00057400000001317400000001637400001388<x5000>74000000056861707079740"
        "0000004312e3530"
    ),  # D
    "43000000000001d914e80000000001d9151800030496418f10ff",  # C
    "420000000001d917f800030496418f15c9000002ed",  # B
    "4f0000000000abcdef6f726967696e3100",  # O
    "490000400b4e00057400000001396e6e6e6e",  # I
    "43000000000001d917f80000000001d9184000030496418f15c9",  # C
    "420000000001d923d800030496418f1c69000002ee",  # B
    "59000040077075626c6963006d6f6f6400",  # Y
    (
        "520000400b7075626c69630074006600050169640000000017ffffffff016e616d650000000019ff"
        "ffffff016269670000000019ffffffff016d0000004007ffffffff01707269636500000006a4000a"
        "0006"
    ),  # R
    "5400000001000000400b",  # T
    "43000000000001d923d80000000001d9254800030496418f1c69",  # C
    "420000000001d9258800030496418f1f5b000002ef",  # B
    "4d010000000001d92588706678000000000568656c6c6f",  # M
    "43000000000001d925880000000001d925b800030496418f1f5b",  # C
]
BIG = b"x" * 5000
INT4, TEXT, NUMERIC, MOOD = 23, 25, 1700, 0x4007
TABLE = 0x400B


def payload(text: str) -> bytes:
    return bytes.fromhex(re.sub(r"<x(\d+)>", lambda m: "78" * int(m.group(1)), text))


MESSAGES = [pgoutput.decode(payload(text)) for text in CAPTURED]


def of(kind: type) -> list:
    return [m for m in MESSAGES if isinstance(m, kind)]


def test_every_message_type_of_the_session_decodes() -> None:
    kinds = {"B": Begin, "C": Commit, "O": Origin, "R": Relation, "Y": Type, "I": Insert}
    kinds |= {"U": Update, "D": Delete, "T": Truncate, "M": Message}
    letters = "".join(chr(payload(text)[0]) for text in CAPTURED)
    assert letters == "BYRIICBUCBUCBDCBYRUCBDCBOICBYRTCBMC"
    assert [type(m) for m in MESSAGES] == [kinds[letter] for letter in letters]


def test_transactions_frame_their_changes() -> None:
    begins, commits = of(Begin), of(Commit)
    assert len(begins) == len(commits) == 9
    for begin, commit in zip(begins, commits, strict=True):
        assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
        assert begin.commit_time_us == commit.commit_time_us
    assert [b.xid for b in begins] == [
        0x2E5,
        0x2E6,
        0x2E7,
        0x2E8,
        0x2EA,
        0x2EB,
        0x2ED,
        0x2EE,
        0x2EF,
    ]
    assert pgoutput.to_datetime(begins[0].commit_time_us).year == 2026
    assert begins[0].final_lsn < begins[1].final_lsn


def test_relation_and_type_describe_the_table() -> None:
    relation = of(Relation)[0]
    assert (relation.relation_id, relation.namespace, relation.name) == (TABLE, "public", "t")
    assert relation.replica_identity == "d"
    assert relation.column_names == ("id", "name", "big", "m", "price")
    assert [c.type_oid for c in relation.columns] == [INT4, TEXT, TEXT, MOOD, NUMERIC]
    assert relation.key_columns == ("id",)
    assert pgoutput.numeric_precision_scale(relation.columns[4].type_modifier) == (10, 2)
    assert relation.columns[0].type_modifier == -1
    full = of(Relation)[1]
    assert full.replica_identity == "f"
    assert full.key_columns == full.column_names  # under FULL every column is "key"
    assert of(Type)[0] == Type(MOOD, "public", "mood")


def test_inserts_carry_every_value_as_text() -> None:
    first, second, replayed = of(Insert)
    assert first.relation_id == TABLE
    assert first.new == (b"1", b"a", BIG, b"happy", b"1.50")
    assert second.new == (b"2", None, None, None, None)
    assert replayed.new == (b"9", None, None, None, None)


def test_updates_unchanged_toast_and_key_changes() -> None:
    toast, moved, full = of(Update)
    assert toast.old is None and toast.old_kind is None
    assert toast.new == (b"1", b"b", UNCHANGED, b"happy", b"1.50")
    assert toast.unchanged == (2,)
    assert pgoutput.resolve_unchanged(toast) == (toast.new, (2,))  # DEFAULT: still unknown
    assert moved.old_kind == "K"
    assert moved.old == (b"2", None, None, None, None)
    assert moved.new == (b"3", None, None, None, None)
    assert full.old_kind == "O"
    assert full.old == (b"1", b"b", BIG, b"happy", b"1.50")
    assert full.unchanged == (2,)
    resolved, left = pgoutput.resolve_unchanged(full)
    assert resolved == (b"1", b"c", BIG, b"happy", b"1.50") and left == ()


def test_deletes_old_key_or_old_row() -> None:
    by_key, by_row = of(Delete)
    assert (by_key.old_kind, by_key.old) == ("K", (b"3", None, None, None, None))
    assert (by_row.old_kind, by_row.old) == ("O", (b"1", b"c", BIG, b"happy", b"1.50"))


def test_origin_truncate_and_message() -> None:
    (origin,) = of(Origin)
    assert origin == Origin(0xABCDEF, "origin1")
    (truncate,) = of(Truncate)
    assert truncate == Truncate((TABLE,), cascade=False, restart_identity=False)
    (message,) = of(Message)
    assert (message.transactional, message.prefix, message.content) == (True, "pfx", b"hello")


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"", "empty"),
        (b"Z\x00", "unknown pgoutput message type"),
        (payload(CAPTURED[3])[:20], "truncated or malformed"),
        (bytes.fromhex("490000400b4e0001" + "78"), "unknown tuple value kind"),
        (bytes.fromhex("490000400b58"), "Insert without a new tuple"),
    ],
)
def test_malformed_payloads_are_refused(data: bytes, problem: str) -> None:
    with pytest.raises(ProtocolError, match=problem):
        pgoutput.decode(data)


def test_lsn_text_round_trips() -> None:
    for text in ("0/0", "0/16B3748", "1A/FFFFFFFF"):
        assert pgoutput.format_lsn(pgoutput.parse_lsn(text)) == text
    assert pgoutput.parse_lsn("1/0") == 1 << 32


def test_numeric_type_modifiers() -> None:
    assert pgoutput.numeric_precision_scale(-1) is None
    assert pgoutput.numeric_precision_scale(((12 << 16) | 2) + 4) == (12, 2)
    assert pgoutput.numeric_precision_scale(((5 << 16) | (-3 & 0x7FF)) + 4) == (5, -3)


def test_unchanged_marker_is_one_object() -> None:
    import copy
    import pickle

    assert copy.deepcopy(UNCHANGED) is UNCHANGED
    assert pickle.loads(pickle.dumps(UNCHANGED)) is UNCHANGED
    assert repr(UNCHANGED) == "UNCHANGED"

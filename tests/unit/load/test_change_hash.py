"""The change hash a change source stages is kept by the load only while it is still right."""

from __future__ import annotations

import pyarrow as pa

from pipeline.config import Entity
from pipeline.core import hashing
from pipeline.core.names import CHECK_COLS, CHECK_HASH, RAW_META_COLUMNS
from pipeline.load.raw import _change_hashed, with_check_hash


def entity(check_cols: tuple[str, ...] | None = None) -> Entity:
    return Entity(
        name="orders",
        source="postgres",
        object_name="public.orders",
        unique_key=("order_id",),
        strategy="check" if check_cols else "timestamp",
        check_cols=check_cols,
        updated_at=None if check_cols else "updated_at",
        mode="log",
    )


def rows() -> pa.Table:
    return pa.table(
        {
            "order_id": pa.array([1, 2, 3], pa.int64()),
            "quantity": pa.array([5, None, 7], pa.int32()),
            "status": pa.array(["new", "paid", None]),
            "_op": pa.array(["insert", "update", "delete"]),
            "_seq": pa.array([0, 1, 2], pa.uint64()),
        }
    )


def staged(e: Entity) -> pa.Table:
    """A part as the change source stages it: hashed while it was read."""
    batch = rows().to_batches()[0]
    return pa.Table.from_batches([hashing.with_check_hash(batch, e.check_cols, RAW_META_COLUMNS)])


def marked(part: pa.Table) -> pa.Table:
    """`part` with a staged hash no computation gives: kept or not, the output tells."""
    i = part.column_names.index(CHECK_HASH)
    return part.set_column(i, CHECK_HASH, pa.repeat(pa.scalar(0, pa.uint64()), part.num_rows))


def test_a_record_batch_hashes_as_a_table_does() -> None:
    for e in (entity(), entity(("status",))):
        table = staged(e)
        assert table.column(CHECK_HASH).equals(with_check_hash(rows(), e).column(CHECK_HASH))
        assert (
            table.column(CHECK_COLS).to_pylist()
            == with_check_hash(rows(), e).column(CHECK_COLS).to_pylist()
        )


def test_an_untouched_part_keeps_its_staged_hash() -> None:
    e = entity()
    part = marked(staged(e))
    assert _change_hashed(part, part, e, untouched=True) is part


def test_a_touched_part_is_hashed_again() -> None:
    e = entity()
    part = staged(e)
    filled = part.set_column(1, "quantity", pa.array([5, 6, 7], pa.int32()))  # a value filled in
    out = _change_hashed(part, filled, e, untouched=False)
    expected = with_check_hash(filled.drop_columns([CHECK_HASH, CHECK_COLS]), e)
    assert out.column(CHECK_HASH).equals(expected.column(CHECK_HASH))
    assert out.column_names.count(CHECK_HASH) == 1
    assert out.column(CHECK_HASH).to_pylist() != part.column(CHECK_HASH).to_pylist()


def test_a_widened_column_is_hashed_again() -> None:
    e = entity()
    part = staged(e)
    part = marked(staged(e))
    widened = part.set_column(1, "quantity", part.column("quantity").cast(pa.float64()))
    out = _change_hashed(part, widened, e, untouched=True)
    expected = with_check_hash(widened.drop_columns([CHECK_HASH, CHECK_COLS]), e)
    assert out.column(CHECK_HASH).equals(expected.column(CHECK_HASH))
    assert 0 not in out.column(CHECK_HASH).to_pylist()


def test_a_hash_over_other_columns_is_hashed_again() -> None:
    part = staged(entity())  # staged over every column; the entity now checks status only
    now = entity(("status",))
    out = _change_hashed(part, part, now, untouched=True)
    assert out.column(CHECK_COLS).to_pylist() == ["status"] * 3
    assert out.column(CHECK_HASH).equals(with_check_hash(rows(), now).column(CHECK_HASH))


def test_a_part_staged_without_a_hash_is_hashed() -> None:
    e = entity()
    out = _change_hashed(rows(), rows(), e, untouched=True)
    assert out.column(CHECK_HASH).equals(with_check_hash(rows(), e).column(CHECK_HASH))

"""Log-based capture in the bench (`python -m bench.run --log`).

- **orders, 1% in `mode = log`**: a log deployment of the orders table is first-loaded beside
  the incremental one; the decoding floor makes its own slot; then the same 1% change
  (`run.change_orders`) is read by the incremental run, by the log run, and by the floor.
- **N changes end to end** (`--log-changes`, default 1M): a fresh log deployment is
  first-loaded, the floor makes its slot, every order is updated again and again until N
  changes are in the log, then one log batch consumes them (Extract -> LoadRaw, then the
  Snapshot) and the floor reads the same N changes.

The decoding floor (`floors.py pg_decode`) is a bare pgoutput read in Python: psycopg2's
`read_message()` loop up to a pin, counting messages by their first byte.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.run import Bench, Sample

LOG_CONFIG = "[entity.orders]\nmode = log\n"
UPDATE_CHUNK = 200_000


def _env(bench: Bench) -> dict[str, str]:
    """The override that turns the orders entity to mode = log (luigi reads it last)."""
    path = bench.root / "orders-log.cfg"
    if not path.exists():
        path.write_text(LOG_CONFIG)
    return {"LUIGI_CONFIG_PATH": str(path)}


def _slot(bench: Bench, name: str) -> str | None:
    """The decoding floor's own slot (a set-up step: measured, not a figure)."""
    from bench.run import BenchError

    slot = f"bench_floor_{name}".replace("-", "_").lower()
    try:
        bench.floor(f"setup/pg_slot/{slot}", "pg_slot", "--slot", slot)
    except BenchError as exc:
        bench.failures.setdefault(f"setup/pg_slot/{slot}", str(exc))
        return None
    return slot


def before_change(bench: Bench, scale: str, rep: int) -> str | None:
    """The log deployment's first load, and the floor's slot; None when the first load failed."""
    seq = f"{scale}-orders-log-{rep}"
    name = f"{scale}/ours/orders_log_initial"
    if bench.attempt(name, bench.ours, seq, ["orders"], env=_env(bench)) is None:
        return None
    return _slot(bench, f"{scale}_{rep}")


def after_change(bench: Bench, scale: str, rep: int, slot: str) -> None:
    """The 1% change through the log deployment, then the floor over the same changes."""
    seq = f"{scale}-orders-log-{rep}"
    bench.attempt(f"{scale}/ours/orders_log1", bench.ours, seq, ["orders"], env=_env(bench))
    bench.attempt(f"{scale}/floor/pg_decode_1pct", bench.floor, "pg_decode", "--slot", slot)
    bench.attempt(f"{scale}/ours/orders_log0", bench.ours, seq, ["orders"], env=_env(bench))


def update_orders(env: dict[str, str], changes: int) -> int:
    """Update orders (quantity + 1, updated_at = now()) until `changes` rows changed; each
    statement is one transaction of at most UPDATE_CHUNK rows. Returns the changes made."""
    import psycopg2

    conn = psycopg2.connect(env["CDC_POSTGRES_DSN"])
    conn.autocommit = True
    made = 0
    with conn.cursor() as cur:
        cur.execute("SELECT min(order_id), max(order_id) FROM public.orders")
        low, high = cur.fetchone()
        start = low
        while made < changes:
            stop = min(start + min(UPDATE_CHUNK, changes - made), high + 1)
            cur.execute(
                "UPDATE public.orders SET quantity = quantity + 1, updated_at = now()"
                " WHERE order_id >= %s AND order_id < %s",
                (start, stop),
            )
            made += cur.rowcount
            start = low if stop > high else stop
    conn.close()
    return made


def million(bench: Bench, scale: str, changes: int) -> None:
    """N changes in one log batch, end to end, beside the floor reading the same N."""
    seq = f"{scale}-orders-log-many"
    env = _env(bench)
    initial = bench.attempt(
        f"{scale}/ours/orders_log_many_initial", bench.ours, seq, ["orders"], env=env
    )
    slot = _slot(bench, f"{scale}_many") if initial else None
    if slot is not None:
        made = update_orders(bench.env, changes)
        bench.notes.append(f"{scale}: {made} order changes for the log batch")
        bench.attempt(f"{scale}/ours/orders_log_many", bench.ours, seq, ["orders"], env=env)
        bench.attempt(f"{scale}/floor/pg_decode_many", bench.floor, "pg_decode", "--slot", slot)


# -- report ----------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    import statistics

    return statistics.median(values) if values else None


def _stage(runs: list[Sample], *stages: str) -> float | None:
    """Median seconds in these stages (None for a floor, which has no stages)."""
    return _median([sum(s.stages.get(k, 0.0) for k in stages) for s in runs if s.stages])


def _read(runs: list[Sample]) -> float | None:
    values = [s.extra.get("entities", {}).get("orders", {}).get("read_s") for s in runs]
    return _median([v for v in values if v is not None])


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarise(samples: dict[str, list[Sample]], scale: str) -> dict[str, Any]:
    """The log figures: walls and stage times, rows/s, and the issue's three targets."""

    def get(name: str) -> list[Sample]:
        return samples.get(f"{scale}/{name}", [])

    log1, incr1 = get("ours/orders_log1"), get("ours/orders_incr1")
    floor1, floor_many = get("floor/pg_decode_1pct"), get("floor/pg_decode_many")
    many = get("ours/orders_log_many")
    initial, log0 = get("ours/orders_log_initial"), get("ours/orders_log0")
    out: dict[str, Any] = {"lines": [], "checks": []}
    for label, runs in (
        ("orders first load, mode = log", initial),
        ("orders 1%, incremental (polled)", incr1),
        ("orders 1%, mode = log", log1),
        ("orders no change, mode = log", log0),
        ("decoding floor, the same 1%", floor1),
        ("N changes, mode = log, one batch", many),
        ("decoding floor, the same N", floor_many),
    ):
        if runs:
            out["lines"].append(
                {
                    "label": label,
                    "wall": _median([s.wall for s in runs]),
                    "inside": _median([s.inside for s in runs if s.inside is not None]),
                    "extract": _stage(runs, "extract"),
                    "load": _stage(runs, "load"),
                    "snapshot": _stage(runs, "snapshot"),
                    "read": _read(runs),
                    "rows": _median([s.rows for s in runs if s.rows is not None]),
                }
            )
    changes = _median([s.rows for s in floor_many if s.rows is not None])
    floor_s = _median([s.inside for s in floor_many if s.inside is not None])
    consumed = _stage(many, "extract", "load")
    whole = _stage(many, "extract", "load", "snapshot")
    if changes and floor_s and consumed and whole:
        out["rates"] = {
            "changes": changes,
            "floor_rows_s": changes / floor_s,
            "consumed_rows_s": changes / consumed,
            "with_snapshot_rows_s": changes / whole,
            "read_rows_s": changes / r if (r := _read(many)) else None,
        }
        out["checks"].append(
            _check(
                "N changes consumed (extract + load) / decoding floor, rows/s",
                (changes / consumed) / (changes / floor_s),
                0.5,
                ">=",
            )
        )
    out["checks"].append(
        _check(
            "orders 1% wall: log / incremental",
            _ratio(_median([s.wall for s in log1]), _median([s.wall for s in incr1])),
            1.0,
            "<=",
        )
    )
    linear = _linear(log0, log1, floor1, many, floor_many)
    if linear is not None:
        out["linear"] = linear
        out["checks"].append(
            _check(
                "1% batch / (no-change batch + 1% x the N batch's cost per change): O(N)",
                linear["measured_s"] / linear["predicted_s"],
                1.5,
                "<=",
            )
        )
        first = _stage(initial, "extract", "load")
        out["checks"].append(
            _check(
                "no-change batch / first load (extract + load): not O(table)",
                _ratio(linear["fixed_s"], first),
                0.5,
                "<=",
            )
        )
    return out


def _linear(
    log0: list[Sample], log1: list[Sample], floor1: list[Sample], many: list[Sample],
    floor_many: list[Sample],
) -> dict[str, float] | None:  # fmt: skip
    """A batch's extract + load as fixed cost + changes x cost per change: the fixed cost from
    the no-change batch, the cost per change from the N batch; the 1% batch against that."""
    fixed, small, large = (_stage(r, "extract", "load") for r in (log0, log1, many))
    n_small = _median([s.rows for s in floor1 if s.rows])
    n_large = _median([s.rows for s in floor_many if s.rows])
    if None in (fixed, small, large) or not n_small or not n_large:
        return None
    assert fixed is not None and small is not None and large is not None
    per_change = (large - fixed) / n_large
    return {
        "fixed_s": fixed,
        "per_change_us": per_change * 1e6,
        "measured_s": small,
        "predicted_s": fixed + n_small * per_change,
    }


def _check(what: str, value: float | None, target: float, kind: str) -> dict[str, Any]:
    ok = None if value is None else (value >= target if kind == ">=" else value <= target)
    return {"what": what, "value": value, "target": f"{kind} {target:g}", "ok": ok}


def render(summary: dict[str, Any]) -> str:
    def f(value: Any, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    lines = ["", "Log-based capture (PostgreSQL, mode = log)"]
    header = (
        f"  {'':<36} {'wall s':>7} {'extract':>8} {'read':>7} {'load':>7} {'snap':>7} {'rows':>9}"
    )
    lines.append(header)
    for line in summary.get("lines", []):
        lines.append(
            f"  {line['label']:<36} {f(line['wall']):>7} {f(line['extract']):>8}"
            f" {f(line['read']):>7} {f(line['load']):>7} {f(line['snapshot']):>7}"
            f" {f(line['rows'], '.0f'):>9}"
        )
    rates = summary.get("rates")
    if rates:
        lines.append(
            f"  {rates['changes']:.0f} changes: decoding floor {rates['floor_rows_s']:,.0f}/s;"
            f" ours: source read {f(rates['read_rows_s'], ',.0f')}/s, consumed (extract + load)"
            f" {rates['consumed_rows_s']:,.0f}/s,"
            f" with the snapshot {rates['with_snapshot_rows_s']:,.0f}/s"
        )
    linear = summary.get("linear")
    if linear:
        lines.append(
            f"  extract + load: fixed {linear['fixed_s']:.2f} s (no-change batch) +"
            f" {linear['per_change_us']:.1f} us per change; the 1% batch took"
            f" {linear['measured_s']:.2f} s, predicted {linear['predicted_s']:.2f} s"
        )
    for check in summary.get("checks", []):
        state = {True: "ok", False: "MISSED", None: "-"}[check["ok"]]
        lines.append(f"  target: {check['what']}: {f(check['value'])} ({check['target']}) {state}")
    return "\n".join(lines)

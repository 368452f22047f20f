"""Medians, ratios against floors and dlt, the issue's targets, and the printed table.

Ratios compare whole-process wall times (both sides pay interpreter start-up and their imports)
except where a stage is compared with a floor's own work (extraction, snapshot vs staging read):
those compare the stage's `run()` time with the floor's time after its imports.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.run import Sample

MONGO_FLOORS = {"mongo_pylist": "pymongo + from_pylist", "mongo_pymongoarrow": "pymongoarrow"}
PG_FLOORS = {"pg_adbc": "ADBC", "pg_copy": "COPY csv", "pg_cursor": "server cursor"}
OURS = {
    "users_initial": "users path, initial",
    "users_nochange": "users path, no change",
    "users_change1": "users path, 1% change",
    "users_change10": "users path, 10% change",
    "users_cs_initial": "users changestream, bootstrap scan",
    "users_cs_nochange": "users changestream, no change",
    "users_cs_change1": "users changestream, 1% change",
    "users_cs_change10": "users changestream, 10% change",
    "orders_initial": "orders, initial",
    "orders_incr1": "orders, 1% incremental",
    "runall": "RunAll end to end (3 entities + marts)",
    "users_stage_extract": "users initial: Extract alone",
    "users_stage_load": "users initial: LoadRaw alone",
    "users_stage_snapshot": "users initial: Snapshot alone",
}
DLT = {"initial": "initial", "nochange": "no change", "change1": "1% change"}
# bench/changestream.py: change-stream phase -> its target against the full-scan read floor
STREAM_TARGETS = {"nochange": 0.1, "change1": 0.2, "change10": None}


def _median(values: Sequence[float | int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _line(kind: str, label: str, runs: Sequence[Sample], **more: Any) -> dict[str, Any]:
    stage_names = sorted({k for s in runs for k in s.stages})
    stages = {k: _median([s.stages.get(k) for s in runs]) for k in stage_names}
    inside = _median([s.inside for s in runs])
    stage_peaks: dict[str, float] = {}
    for s in runs:
        for stage, mb in s.extra.get("extra", {}).get("stage_peak_mb", {}).items():
            stage_peaks[stage] = max(stage_peaks.get(stage, 0.0), mb)
    if stages and inside is not None:
        stages["other"] = max(0.0, inside - sum(v or 0 for v in stages.values()))
    return {
        "kind": kind,
        "label": label,
        "n": len(runs),
        "wall": _median([s.wall for s in runs]),
        "inside": inside,
        "rss_mb": max(s.rss_mb for s in runs),
        "rows": _median([s.rows for s in runs]),
        "stages": stages,
        "stage_peak_mb": stage_peaks,
        **more,
    }


def _written(runs: Sequence[Sample], entity: str, key: str, agg: Any = max) -> Any:
    """What the runs wrote: the maximum by default, so one run that wrote shows."""
    values = [s.extra.get("entities", {}).get(entity, {}).get(key) for s in runs]
    present = [v for v in values if v is not None]
    return agg(present) if present else None


def _check(
    what: str, value: float | None, target: float, kind: str = "<=", unit: str = "x"
) -> dict[str, Any]:
    ok = None
    if value is not None:
        ok = value <= target if kind == "<=" else value < target
    return {"what": what, "value": value, "target": f"{kind} {target:g}{unit}", "ok": ok}


Series = list[float | None]


def _ratio(a: Series, b: Series) -> float | None:
    """Median of the per-run ratios when both sides ran once per repeat, else of the medians.

    Pairing each run with the floor or peer measured next to it cancels most of the drift in
    the machine's load over a bench run.
    """
    if len(a) == len(b) > 1:
        pairs = [x / y for x, y in zip(a, b, strict=True) if x is not None and y]
        return _median(pairs)
    ma, mb = _median(a), _median(b)
    return ma / mb if ma is not None and mb else None


def _plus(a: Series, b: Series) -> Series:
    """Two floors' times added per run when both ran once per repeat, else their medians."""
    if len(a) == len(b) > 1:
        pairs = zip(a, b, strict=True)
        return [x + y if x is not None and y is not None else None for x, y in pairs]
    ma, mb = _median(a), _median(b)
    return [ma + mb] if ma is not None and mb is not None else []


def _in_phase(runs: list[Sample], phase: str | None) -> list[Sample]:
    """The runs measured beside a phase of the users path (all runs if none was tagged)."""
    tagged = [s for s in runs if s.extra.get("phase") == phase]
    return tagged if phase is not None and tagged else runs


def _fastest(
    samples: dict[str, list[Sample]],
    prefix: str,
    names: dict[str, str],
    attr: str = "wall",
    phase: str | None = None,
) -> tuple[str, Series]:
    """The floor: label of the method with the lowest median `attr`, and per run the fastest
    method's value (the floor is whatever plain read was fastest that time)."""
    found = {
        names[k]: [getattr(s, attr) for s in _in_phase(samples[f"{prefix}/{k}"], phase)]
        for k in names
        if f"{prefix}/{k}" in samples
    }
    found = {label: runs for label, runs in found.items() if _median(runs) is not None}
    if not found:
        return "?", []
    label = min(found, key=lambda k: _median(found[k]) or float("inf"))
    lengths = {len(runs) for runs in found.values()}
    if len(lengths) != 1:
        return label, found[label]
    per_run = [
        min((v for v in values if v is not None), default=None)
        for values in zip(*found.values(), strict=True)
    ]
    return label, per_run


def summarise(samples: dict[str, list[Sample]], args: argparse.Namespace) -> dict[str, Any]:
    """Per scale: table lines (medians) and target checks."""
    scales = sorted({name.split("/")[0] for name in samples}, key=_scale_rows)
    out: dict[str, Any] = {}
    for scale in scales:
        lines: list[dict[str, Any]] = []
        checks: list[dict[str, Any]] = []

        def get(name: str, scale: str = scale) -> list[Sample]:
            return samples.get(f"{scale}/{name}", [])

        for key, label in [
            ("mongo_list", "MongoDB list(find()), no Arrow"),
            *((k, f"MongoDB -> Arrow, {v}") for k, v in MONGO_FLOORS.items()),
        ]:
            if get(f"floor/{key}"):
                more = {}
                if key == "mongo_pymongoarrow":
                    abi = get(f"floor/{key}")[0].extra.get("extra", {}).get("abi_warnings")
                    more["note"] = f"{abi} pyarrow ABI warnings at import" if abi else ""
                lines.append(_line("floor", label, get(f"floor/{key}"), **more))
        parquet = get("floor/parquet_s3")
        staging_read = [s.extra.get("extra", {}).get("read_s") for s in parquet]
        if parquet:
            note = f"inside = write; S3 -> Arrow read back {_fmt(_median(staging_read))} s"
            lines.append(_line("floor", "Arrow -> Parquet zstd -> S3", parquet, note=note))
        for window, title in (("pg_all", "PG orders, all"), ("pg_window", "PG orders, window")):
            for key, label in PG_FLOORS.items():
                if get(f"floor/{window}/{key}"):
                    lines.append(
                        _line("floor", f"{title} -> Arrow, {label}", get(f"floor/{window}/{key}"))
                    )
            if get(f"floor/{window}/pg_parquet_s3"):
                runs = get(f"floor/{window}/pg_parquet_s3")
                lines.append(_line("floor", f"{title}: Arrow -> Parquet zstd -> S3", runs))
        for key, label in OURS.items():
            runs = get(f"ours/{key}")
            if not runs:
                continue
            more = {}
            entity = "orders" if key.startswith("orders") else "users"
            if key.startswith(("users_initial", "users_nochange", "users_change", "orders")) or (
                key.startswith("users_cs_")
            ):
                more["snapshot_rows_written"] = _written(runs, entity, "snapshot_rows_written")
                more["raw_rows_written"] = _written(runs, entity, "raw_rows_written", _median)
                more["note"] = (
                    f"wrote {_fmt(more['raw_rows_written'], '.0f')} raw rows (median), "
                    f"{more['snapshot_rows_written']} snapshot rows (max)"
                )
            fixed = (
                _median([s.import_s for s in runs]),
                _median([s.extra.get("open_s") for s in runs]),
            )
            if fixed[1] is not None:
                more["note"] = (more.get("note", "") + "; " if more.get("note") else "") + (
                    f"fixed: imports {_fmt(fixed[0])} s, warehouse start-up {_fmt(fixed[1])} s"
                )
            lines.append(_line("ours", label, runs, **more))
        for key, label in DLT.items():
            if get(f"dlt/{key}"):
                lines.append(
                    _line("dlt", f"dlt scd2 (Arrow -> DuckDB), {label}", get(f"dlt/{key}"))
                )

        def wall(name: str) -> Series:
            return [s.wall for s in get(name)]

        def stage(name: str, stage: str) -> Series:
            return [s.stages.get(stage) for s in get(name)]

        floors = f"{scale}/floor"
        milabel, mfloor_inside = _fastest(samples, floors, MONGO_FLOORS, "inside", "initial")
        wlabel, wfloor = _fastest(samples, f"{floors}/pg_window", PG_FLOORS)
        wilabel, wfloor_inside = _fastest(samples, f"{floors}/pg_window", PG_FLOORS, "inside")
        ailabel, afloor_inside = _fastest(samples, f"{floors}/pg_all", PG_FLOORS, "inside")
        for phase, target in (("initial", 1.25), ("change1", 1.25), ("nochange", 1.15)):
            key = f"users_{phase}"
            mlabel, mfloor = _fastest(samples, floors, MONGO_FLOORS, "wall", phase)
            checks.append(
                _check(
                    f"{OURS[key]} / Mongo read floor ({mlabel})",
                    _ratio(wall(f"ours/{key}"), mfloor),
                    target,
                )
            )
        written = _written(get("ours/users_nochange"), "users", "snapshot_rows_written")
        checks.append(_check("users no change: snapshot rows written", written, 0, unit=" rows"))
        for key, peer in (("users_initial", "initial"), ("users_change1", "change1")):
            ratio = _ratio(wall(f"ours/{key}"), wall(f"dlt/{peer}"))
            checks.append(_check(f"{OURS[key]} / dlt", ratio, 0.8, "<"))
        ratio = _ratio(wall("ours/users_nochange"), wall("dlt/nochange"))
        checks.append(
            {**_check(f"{OURS['users_nochange']} / dlt", ratio, 0), "target": "", "ok": None}
        )
        for key in ("users_initial", "users_nochange", "users_change1"):
            checks.append(
                _check(
                    f"{OURS[key]}: snapshot stage / staging read",
                    _ratio(stage(f"ours/{key}", "snapshot"), staging_read),
                    1.0,
                )
            )
        checks.append(
            _check(
                f"orders 1% incremental / PG window floor ({wlabel})",
                _ratio(wall("ours/orders_incr1"), wfloor),
                1.5,
            )
        )

        def inside(name: str) -> Series:
            return [s.inside for s in get(name)]

        def read(name: str, entity: str) -> Series:
            return [s.extra.get("entities", {}).get(entity, {}).get("read_s") for s in get(name)]

        # issue 3: the extract stage against the bare read, then against the read plus the
        # staging write of the same rows (what the stage does), then its source read alone
        for name, entity, what, read_floor, write, flabel in (
            ("users_initial", "users", "users", mfloor_inside, "parquet_s3", milabel),
            (
                "orders_initial",
                "orders",
                "orders all",
                afloor_inside,
                "pg_all/pg_parquet_s3",
                ailabel,
            ),
            (
                "orders_incr1",
                "orders",
                "orders 1%",
                wfloor_inside,
                "pg_window/pg_parquet_s3",
                wilabel,
            ),
        ):
            stage_s = stage(f"ours/{name}", "extract")
            with_write = _plus(read_floor, inside(f"floor/{write}"))
            for label, ours_s, floor_s in (
                (f"extract stage / read floor ({flabel})", stage_s, read_floor),
                ("extract stage / read + staging write floors", stage_s, with_write),
                ("source read in the stage / read floor", read(f"ours/{name}", entity), read_floor),
            ):
                checks.append(_check(f"{what}: {label}, inside", _ratio(ours_s, floor_s), 1.5))
        # change streams: inside time against the full-scan read floor measured beside it
        for phase, target in STREAM_TARGETS.items():
            flabel, floor_inside = _fastest(samples, floors, MONGO_FLOORS, "inside", phase)
            ratio = _ratio(inside(f"ours/users_cs_{phase}"), floor_inside)
            check = _check(
                f"{OURS[f'users_cs_{phase}']} / read floor ({flabel}), inside", ratio, target or 0
            )
            checks.append(check if target else {**check, "target": "", "ok": None})
            versus = _ratio(inside(f"ours/users_cs_{phase}"), inside(f"ours/users_{phase}"))
            what = f"{OURS[f'users_cs_{phase}']} / full scan, inside"
            checks.append({**_check(what, versus, 0), "target": "", "ok": None})
        written = _written(get("ours/users_cs_nochange"), "users", "snapshot_rows_written")
        checks.append(
            _check("users changestream no change: snapshot rows", written, 0, unit=" rows")
        )
        if _scale_rows(scale) >= 1_000_000:
            base = next((s for s in scales if _scale_rows(s) < _scale_rows(scale)), None)
            for phase in ("nochange", "change1"):
                runs = get(f"ours/users_cs_{phase}")
                small = samples.get(f"{base}/ours/users_cs_{phase}", []) if base else []
                if runs and small:
                    growth = max(s.rss_mb for s in runs) / max(s.rss_mb for s in small)
                    what = f"{OURS[f'users_cs_{phase}']}: peak RSS {scale} / {base}"
                    checks.append(_check(what, growth, 1.25))
        if _scale_rows(scale) >= 1_000_000:
            peak = max(
                (s.rss_mb for k in OURS for s in get(f"ours/{k}") if k.startswith("users")),
                default=None,
            )
            checks.append(_check("users path peak RSS (any run)", peak, 600, "<", " MB"))
            base = next((s for s in scales if _scale_rows(s) < _scale_rows(scale)), None)
            if base is not None:
                ratio = _ratio(
                    [_median(wall("ours/users_initial"))],
                    [_median([s.wall for s in samples.get(f"{base}/ours/users_initial", [])])],
                )
                checks.append(_check(f"users initial time {scale} / {base}", ratio, 7.5))
        extraction = [
            _rate(get("ours/users_initial"), "MongoDB users, full scan", mfloor_inside, milabel),
            _rate(get("ours/orders_incr1"), "PostgreSQL orders, 1% window", wfloor_inside, wilabel),
            _rate(get("ours/orders_initial"), "PostgreSQL orders, all", afloor_inside, ailabel),
        ]
        out[scale] = {
            "lines": lines,
            "checks": [c for c in checks if c["value"] is not None],
            "extraction": [r for r in extraction if r],
        }
    return out


def _rate(
    runs: Sequence[Sample], source: str, floor_runs: Series, floor: str
) -> dict[str, Any] | None:
    """Rows per second of our extract stage beside the bare driver read (issue 3)."""
    floor_inside = _median(floor_runs)
    n = _median([s.rows for s in runs])
    extract = _median([s.stages.get("extract") for s in runs])
    if not n or not extract:
        return None
    return {
        "source": source,
        "rows": n,
        "ours_rows_s": n / extract,
        "floor_rows_s": n / floor_inside if floor_inside else None,
        "floor": floor,
    }


def _scale_rows(scale: str) -> int:
    number, unit = scale[:-1], scale[-1]
    return int(number) * (1_000_000 if unit == "M" else 1000)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def render(summary: dict[str, Any], meta: dict[str, Any], profile: dict[str, Any]) -> str:
    """The printed report: one table per scale, then the targets, then the profile digest."""
    out: list[str] = []
    load = meta["machine"]
    out.append(
        f"cdc-pipeline bench  {meta['started']}  {load['cpus']} CPUs  python {load['python']}"
        f"  load avg before {load['loadavg_before'][0]:.1f}, after {load['loadavg_after'][0]:.1f}"
    )
    code = meta.get("code", {}).get("before", {})
    if code:
        dirty = len(code.get("uncommitted", []))
        changed = meta["code"]["after"] != code
        out.append(
            f"code: {code['commit']}"
            + (f" + {dirty} uncommitted file(s)" if dirty else "")
            + (" (CHANGED during the run)" if changed else "")
        )
    out.append(
        "wall = median whole-process seconds (fresh process: interpreter, imports and Luigi"
        " included); inside = after imports; peak = max RSS over the runs"
    )
    for scale, part in summary.items():
        out.append("")
        n = max((line["n"] for line in part["lines"] if line["kind"] == "ours"), default=0)
        out.append(
            f"== {scale} users: median of {n} run(s) per figure"
            " (read floors: one per phase of each run) =="
        )
        out.append(
            f"{'':6} {'figure':<46} {'wall s':>7} {'inside s':>8} {'peak MB':>8} {'rows':>9}"
        )
        for line in part["lines"]:
            out.append(
                f"{line['kind']:<6} {line['label']:<46} {_fmt(line['wall']):>7}"
                f" {_fmt(line['inside']):>8} {_fmt(line['rss_mb'], '.0f'):>8}"
                f" {_fmt(line['rows'], '.0f'):>9}"
            )
            if line["stages"]:
                parts = " | ".join(f"{k} {v:.2f}" for k, v in line["stages"].items() if v)
                out.append(f"{'':8}stages: {parts}")
            if line.get("stage_peak_mb"):
                peaks = " | ".join(f"{k} {v:.0f}" for k, v in line["stage_peak_mb"].items())
                out.append(f"{'':8}peak RSS MB while in: {peaks}")
            if line.get("note"):
                out.append(f"{'':8}{line['note']}")
        if part["extraction"]:
            out.append("")
            out.append(f"{'':6} {'extraction (rows/s)':<46} {'ours':>9} {'floor':>9}")
            for row in part["extraction"]:
                floor = row.get("floor_rows_s")
                out.append(
                    f"{'':6} {row['source']:<46} {row['ours_rows_s']:>9.0f}"
                    f" {_fmt(floor, '.0f'):>9}  {row.get('floor', '')}"
                )
        if part["checks"]:
            out.append("")
            out.append(f"{'':6} {'target':<68} {'value':>8} {'target':>10}")
            for check in part["checks"]:
                verdict = {True: "ok", False: "MISS", None: ""}[check["ok"]]
                value = check["value"]
                whole = "MB" in check["target"] or "rows" in check["target"]
                shown = _fmt(value, ".0f" if whole else ".2f")
                out.append(
                    f"{'':6} {check['what']:<68} {shown:>8} {check['target']:>10}  {verdict}"
                )
    if profile:
        out.append("")
        out.append("== profile (py-spy, users runs; % of the process's main-thread samples) ==")
        for run, found in profile.items():
            out.append(f"{run}: {found['samples']} samples, raw stacks in {found['raw']}")
            if found.get("imports"):
                shown = ", ".join(
                    f"{m.removeprefix('import ')} {p:.0f}%" for m, p in found["imports"][:5]
                )
                out.append(f"  imports, wherever they happen: {shown}")
            for stage, share in found["stages"].items():
                out.append(f"  {stage:<10} {share:5.1f}%")
                for fn, pct in found["top"].get(stage, [])[:5]:
                    out.append(f"{'':14}{pct:5.1f}%  {fn}")
                for fn, pct in found.get("self", {}).get(stage, [])[:3]:
                    out.append(f"{'':14}{pct:5.1f}%  self: {fn}")
    if meta.get("failures"):
        out.append("")
        out.append("FAILED: " + ", ".join(sorted(meta["failures"])))
    return "\n".join(out)


def main() -> None:
    """Re-render a results file (`python -m bench.report bench/results/X.json`)."""
    import json
    import sys
    from pathlib import Path

    from bench.profile import summarise_profile
    from bench.run import Sample

    payload = json.loads(Path(sys.argv[1]).read_text())
    samples = {
        name: [Sample(**run) for run in figure["runs"]]
        for name, figure in payload["figures"].items()
    }
    summary = summarise(samples, argparse.Namespace(**payload["meta"]["args"]))
    profile = payload.get("profile") or {}
    root = Path(__file__).resolve().parent.parent
    for found in profile.values():
        if (root / found["raw"]).exists():
            found.update(summarise_profile(root / found["raw"]))
    print(render(summary, payload["meta"], profile))


if __name__ == "__main__":
    main()

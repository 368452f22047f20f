"""Digest of a py-spy profile (`record --idle --threads -f raw`): where the wall time goes.

Only the main thread is attributed (with --idle its samples are wall-clock time, waits on the
servers included). Each sample is billed to the stage whose task `run()` is on its stack, to
imports, or to Luigi's own work (scheduling, `complete()` checks); within a stage the functions
are ranked by inclusive share, so the first project function listed is where to look.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

STAGE_FRAMES = {
    "Extract.run": "extract",
    "PlanRanges.run": "extract",
    "ExtractRange.run": "extract",
    "LoadRaw.run": "load",
    "Snapshot.run": "snapshot",
    "BuildMart.run": "marts",
}
# frames that sit on every stack of a stage and say nothing about it
NOISE = ("_run_module_as_main", "_run_code", "<module>", "main (bench/", "build (luigi",
         "_schedule_and_run", "Worker.run", "Worker._run_task", "TaskProcess.run",
         "TaskProcess._run_get_new_deps", "MainThread", "_find_and_load", "_load_unlocked",
         "_call_with_frames_removed", "exec_module", "_handle_fromlist", "Worker.add (luigi",
         "SingleProcessPool.apply_async", "check_complete", "Task.complete")  # fmt: skip
TOP = 8
# a frame on at least this share of a stage's samples is an ancestor, not a finding
ANCESTOR_SHARE = 0.97


def _function(frame: str) -> str:
    """`name (path:line)` -> `name (path)`: lines of one function add up."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def _stage(frames: list[str]) -> str:
    for frame in frames:
        head = frame.split(" (", 1)[0]
        if head in STAGE_FRAMES:
            return STAGE_FRAMES[head]
    if any(f.startswith("_written (bench/") for f in frames):
        return "bench"  # counting after the clock stopped: not part of the run
    if any(f.startswith("_find_and_load") for f in frames):
        return "imports"
    if any("luigi/" in f for f in frames):
        return "luigi"
    return "other"


def summarise_profile(path: Path) -> dict[str, Any]:
    """Main thread: {samples, stages: {stage: %}, top / self: {stage: [(function, %)]}}.

    `top` ranks by inclusive time and leaves out frames on (nearly) every stack of the stage;
    `self` ranks the innermost frames, where the CPU or the wait actually is.
    """
    stage_samples: Counter[str] = Counter()
    inclusive: dict[str, Counter[str]] = defaultdict(Counter)
    leaves: dict[str, Counter[str]] = defaultdict(Counter)
    imported: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            continue
        n = int(count)
        stage = _stage(frames)
        if stage == "bench":
            continue
        total += n
        stage_samples[stage] += n
        leaves[stage][_function(frames[-1])] += n
        seen = set()
        importing = False
        for frame in frames[1:]:
            if frame.startswith("_find_and_load"):
                if not importing:
                    importing = True
                    module = next(
                        (f for f in frames[frames.index(frame) :] if f.startswith("<module> (")),
                        None,
                    )
                    if module:
                        name = "import " + _function(module).split(" (", 1)[1].rstrip(")")
                        inclusive[stage][name] += n
                        imported[name] += n
                        seen.add(name)
                continue
            fn = _function(frame)
            if fn in seen or any(fn.startswith(x) or x in fn for x in NOISE):
                continue
            if fn.split(" (", 1)[0] in STAGE_FRAMES:
                continue
            seen.add(fn)
            inclusive[stage][fn] += n
    if not total:
        return {"samples": 0, "stages": {}, "top": {}, "self": {}, "imports": []}

    def ranked(counts: Counter[str], stage: str, ancestors: bool) -> list[tuple[str, float]]:
        limit = ANCESTOR_SHARE * stage_samples[stage]
        kept = [(f, n) for f, n in counts.most_common() if ancestors or n < limit]
        return [(f, 100 * n / total) for f, n in kept[:TOP]]

    return {
        "samples": total,
        "stages": {s: 100 * n / total for s, n in stage_samples.most_common()},
        "top": {stage: ranked(counts, stage, False) for stage, counts in inclusive.items()},
        "self": {stage: ranked(counts, stage, True) for stage, counts in leaves.items()},
        # module imports wherever they happen (lazy imports inside a stage included)
        "imports": [(m, 100 * n / total) for m, n in imported.most_common(TOP)],
    }


def main() -> None:
    import sys

    for arg in sys.argv[1:]:
        found = summarise_profile(Path(arg))
        print(f"{arg}: {found['samples']} samples")
        print("  imports anywhere: " + ", ".join(f"{m} {p:.1f}%" for m, p in found["imports"]))
        for stage, share in found["stages"].items():
            print(f"  {stage:<10} {share:5.1f}%")
            for fn, pct in found["top"].get(stage, []):
                print(f"{'':14}{pct:5.1f}%  {fn}")
            for fn, pct in found["self"].get(stage, [])[:4]:
                print(f"{'':14}{pct:5.1f}%  self: {fn}")


if __name__ == "__main__":
    main()

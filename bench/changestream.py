"""MongoDB change streams in the bench: the users path in `mode = changestream` beside `full`.

In each phase of the users path (initial, no change, 1% change) our full-scan run is followed
at once by a change-stream deployment of the same users entity (its own warehouse, staging
prefix and stored position) on the same data: the initial run is its bootstrap scan, the
later ones read only the stream. At the main scale a fourth phase changes 10% of the users,
read by the read floors, the full-scan run and the change-stream run. `--no-changestream`
skips all of it. Targets (README of bench): inside time against the full-scan read floor's.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.run import Bench

CONFIG = "[entity.users]\nmode = changestream\n"
_FAILED: set[str] = set()  # sequences whose bootstrap failed: later phases would mean nothing


def _env(bench: Bench) -> dict[str, str]:
    """The override that turns the users entity to mode = changestream (luigi reads it last)."""
    path = bench.root / "users-changestream.cfg"
    if not path.exists():
        path.write_text(CONFIG)
    return {"LUIGI_CONFIG_PATH": str(path)}


def ours(bench: Bench, scale: str, rep: int, phase: str) -> None:
    """One change-stream run of the users entity, measured like every run of ours."""
    from bench.run import batch_id

    seq = f"{scale}-users-cs-{rep}"
    if not bench.args.changestream or seq in _FAILED:
        return

    def run(name: str) -> object:
        cmd = [sys.executable, "-m", "bench.worker", "--batch", batch_id(), "--entity", "users"]
        return bench.measure(name, cmd, {**bench.pipeline_env(seq), **_env(bench)})

    if bench.attempt(f"{scale}/ours/users_cs_{phase}", run, phase=phase) is None:
        _FAILED.add(seq)


def change10(bench: Bench, scale: str, rep: int) -> None:
    """10% of the users changed, then the read floors, the full-scan run and ours again."""
    from bench.run import READ_FLOORS, change_users

    if not bench.args.changestream:
        return
    changed = change_users(bench.env, 0.10, seed=3000 + rep)
    bench.notes.append(f"{scale} run {rep}: users change (10%) {changed}")
    for method in READ_FLOORS:
        bench.attempt(f"{scale}/floor/{method}", bench.floor, method, phase="change10")
    seq = f"{scale}-users-{rep}"
    name = f"{scale}/ours/users_change10"
    bench.attempt(name, bench.ours, seq, ["users"], phase="change10")
    ours(bench, scale, rep, "change10")

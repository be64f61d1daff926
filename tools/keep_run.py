"""Keep a finished run in the repository: its samples, grids, metrics and how it was made.

    dvc exp run -n long8 -S epochs=8
    python tools/keep_run.py reports/long_run --command "dvc exp run -n long8 -S epochs=8"

Run it in the workspace the run left (a `dvc exp run` leaves its results there; `dvc exp
apply <name>` brings back another). It copies the samples (data/samples/uncond.npz and
cond.npz, the format `ddpm score` and the evaluate stage read), the sample grids, the loss
curves and the metrics into DEST, and writes DEST/README.md: the command, the params that
differ from the committed params.yaml, the minutes of each stage (from the MLflow runs of
the newest execution that trained; a training stage an earlier execution ran, which DVC then
kept, or one resumed after an interruption, by its every epoch in reports/train_<kind>.json), the CPU with its flags, the versions, and the key
numbers of both judges. Nothing is written unless every input is there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ddpm_core import environment  # noqa: E402
from ddpm_core.config import flatten  # noqa: E402
from ddpm_core.errors import DDPMError, exit_on_error  # noqa: E402
from ddpm_core.tracking import stage_minutes  # noqa: E402

# What is copied: (source in the workspace, name in DEST).
FILES = [
    ("data/samples/uncond.npz", "uncond.npz"),
    ("data/samples/cond.npz", "cond.npz"),
    ("reports/figures/samples.png", "samples.png"),
    ("reports/figures/loss.png", "loss.png"),
    ("reports/metrics.json", "metrics.json"),
    ("reports/train_uncond.json", "train_uncond.json"),
    ("reports/train_cond.json", "train_cond.json"),
]
CPU_FLAGS = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")  # the ones that decide the speed here


def cpu() -> str:
    """`AMD EPYC 9R14 (avx2 avx512_bf16 avx512f), 2 cores`: the model and the flags that matter."""
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.is_file() else ""
    flags = {f for f in CPU_FLAGS if re.search(rf"\b{f}\b", text)}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{environment.cpu_model()} ({' '.join(sorted(flags)) or 'none of ' + ', '.join(CPU_FLAGS)}), {cores} cores"


def changed_params(root: Path) -> dict[str, tuple[object, object]]:
    """Keys whose value differs between the committed params.yaml (HEAD) and the workspace's."""
    committed = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=root, capture_output=True, text=True, check=False
    )
    if committed.returncode != 0:
        raise DDPMError(f"{root}: no committed params.yaml to compare with (git show HEAD:params.yaml)")
    before = flatten(yaml.safe_load(committed.stdout))
    after = flatten(yaml.safe_load((root / "params.yaml").read_text()))
    return {k: (before.get(k), after.get(k)) for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)}


def key_numbers(metrics: dict) -> list[str]:
    """The README's table rows: one per model, both judges."""

    def pct(x: float) -> str:
        return f"{100 * x:.1f} %"

    m = metrics
    return [
        "| model | FID × floor (judge 1) | (judge 2) | precision / recall | accuracy | class deviation | exact-zero pixels |",
        "|---|---|---|---|---|---|---|",
        f"| conditional | {m['fid_cond_over_floor']:.2f}× | {m['fid_alt_cond_over_floor']:.2f}× | "
        f"{m['precision_cond']:.2f} / {m['recall_cond']:.2f} | {pct(m['cond_accuracy'])} "
        f"(judge 2: {pct(m['cond_accuracy_alt'])}) | | {pct(m['zero_pixels_cond'])} |",
        f"| unconditional | {m['fid_uncond_over_floor']:.2f}× | {m['fid_alt_uncond_over_floor']:.2f}× | "
        f"{m['precision_uncond']:.2f} / {m['recall_uncond']:.2f} | | "
        f"{100 * m['uncond_max_class_deviation']:.1f} / {100 * m['uncond_max_class_deviation_alt']:.1f} points | "
        f"{pct(m['zero_pixels_uncond'])} |",
        f"| real test digits | 1× ({m['fid_floor']:.2f}) | 1× ({m['fid_alt_floor']:.1f}) | "
        f"{m['precision_floor']:.2f} / {m['recall_floor']:.2f} | | | {pct(m['zero_pixels_real'])} |",
    ]


def minutes_table(root: Path) -> tuple[str, list[str]]:
    """The heading's MLflow run and the rows of the minutes table. A training stage counts its
    epochs from reports/train_<kind>.json where the MLflow run of the newest execution lacks
    it (an earlier execution trained it and DVC kept the outputs) or holds less of it (the
    stage resumed after an interruption: the run covers the epochs after the resume)."""
    execution, minutes = stage_minutes(root)
    notes = {}
    for kind in ("uncond", "cond"):
        stage = f"train_{kind}"
        epochs = json.loads((root / f"reports/{stage}.json").read_text())["train_seconds"] / 60
        if epochs > minutes.get(stage, 0.0):
            why = "resumed, the run holds the last part" if stage in minutes else "an earlier execution trained it"
            minutes[stage], notes[stage] = epochs, f"its epochs (reports/{stage}.json): {why}"
    rows = [
        f"| {stage} | {m:.1f} | {notes.get(stage, 'its MLflow run')} |"
        for stage, m in sorted(minutes.items(), key=lambda kv: -kv[1])
    ]
    return execution, [*rows, f"| all | {sum(minutes.values()):.1f} | |"]


def readme(dest: Path, command: str, root: Path) -> str:
    metrics = json.loads((root / "reports/metrics.json").read_text())
    execution, rows = minutes_table(root)
    changed = changed_params(root)
    env = environment.describe(root)
    lines = [
        f"# {dest.name}: a run the repository keeps",
        "",
        "Made with",
        "",
        f"    {command}",
        "",
        "on " + cpu() + f", torch {env.get('torch', '?')}, at git revision {env.get('git_revision', '?')}.",
        "",
        "## Params changed from params.yaml",
        "",
        "| key | params.yaml | this run |",
        "|---|---|---|",
        *(f"| `{k}` | {a} | {b} |" for k, (a, b) in changed.items()),
        "",
        f"## Minutes per stage (MLflow run `{execution}`)",
        "",
        "| stage | minutes | from |",
        "|---|---|---|",
        *rows,
        "",
        f"## Key numbers (the evaluate stage: {metrics['num_samples']:,} samples a model, both judges)",
        "",
        *key_numbers(metrics),
        "",
        "## Files",
        "",
        "- `uncond.npz`, `cond.npz`: the samples (`images` uint8 N×28×28, `labels` for the conditional"
        " ones): `python benchmarks/score.py reports/" + dest.name + "/cond.npz` judges them again.",
        "- `samples.png`: the sample grids; `loss.png`: the loss curves; `metrics.json`,"
        " `train_*.json`: every number of the run.",
        "",
    ]
    return "\n".join(lines)


def keep(dest: Path, command: str, root: Path | None = None) -> None:
    root = root or Path.cwd()
    missing = [src for src, _ in FILES if not (root / src).is_file()]
    if missing:
        raise DDPMError(f"{root / missing[0]}: missing; run the pipeline (`dvc repro`) before keeping it")
    text = readme(dest, command, root)
    # Everything goes to a temporary folder first: DEST is whole or unchanged.
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        staged = Path(tmp) / dest.name
        staged.mkdir()
        for src, name in FILES:
            shutil.copyfile(root / src, staged / name)
        (staged / "README.md").write_text(text)
        if dest.exists():
            shutil.rmtree(dest)
        staged.rename(dest)
    print(f"kept the run in {dest}: {', '.join(name for _, name in FILES)}, README.md")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dest", type=Path, help="folder to write, e.g. reports/long_run (replaced whole)")
    parser.add_argument("--command", required=True, help="the command that made the run, for the README")
    args = parser.parse_args()
    exit_on_error(lambda: keep(args.dest, args.command))

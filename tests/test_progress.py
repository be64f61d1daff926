"""The run-wide progress line: what it counts (the plan of one execution's trainings), and
what the real training stages print under `dvc repro` as DVC runs one model, both, or
one alone by name."""

from __future__ import annotations

import re
import time

import pytest
import yaml

from conftest import MIRROR, commit_all, run, tiny_raw
from ddpm_core.progress import RunPlan, RunProgress


def test_the_plan_counts_the_steps_of_every_training_and_those_before_this_one():
    plan = RunPlan((("train_uncond", 1875), ("train_cond", 1250)), "train_cond")
    assert plan.total_steps == 3125
    assert plan.steps_before == 1875
    assert RunPlan(plan.trainings, "train_uncond").steps_before == 0
    assert plan.label() == "run (train_uncond → train_cond)"
    with pytest.raises(ValueError, match="'train_x' is not one of the run's trainings"):
        RunPlan(plan.trainings, "train_x")


def test_the_summary_counts_earlier_stages_and_resumed_epochs_and_times_only_this_stage():
    plan = RunPlan((("train_uncond", 100), ("train_cond", 300)), "train_cond")
    progress = RunProgress(plan, done_in_stage=50, live=False)  # resumed after 50 of its steps
    assert progress.done == 150
    assert progress.seconds_left() is None  # no step of this process yet: no rate to go by
    assert progress.summary() == "run 38% of 400 steps (train_uncond → train_cond)"
    started = progress.started
    progress.advance(25)
    # The rate is this stage's own: 25 steps in the seconds since it started.
    left = progress.seconds_left()
    elapsed = time.perf_counter() - started
    assert left is not None and 0 < left <= 225 / 25 * elapsed * 1.01
    assert progress.summary().startswith("run 44% of 400 steps (train_uncond → train_cond), ")
    progress.close()


def epoch_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.match(r"train_\w+ epoch \d+: loss", line)]


@pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no MNIST mirror at {MIRROR}")
def test_the_stages_count_both_trainings_of_one_repro_and_one_alone_when_asked(project_clone):
    project = project_clone
    # 256 images at batch 64: 4 steps per epoch and model.
    (project / "params.yaml").write_text(yaml.safe_dump(tiny_raw(epochs=2), sort_keys=False))
    commit_all(project, "tiny params")

    # `dvc repro sample` trains both models: one run of 16 steps, the second stage
    # starting where the first ended.
    lines = epoch_lines(run(["dvc", "repro", "sample"], project).stdout)
    both = "(train_uncond → train_cond)"
    assert [line.split("; ")[1].split(",")[0] for line in lines] == [
        f"run 25% of 16 steps {both}",
        f"run 50% of 16 steps {both}",
        f"run 75% of 16 steps {both}",
        f"run 100% of 16 steps {both}",
    ], lines
    assert [line.split(" epoch")[0] for line in lines] == ["train_uncond"] * 2 + ["train_cond"] * 2
    assert lines[-1].endswith(", 0:00:00 left")

    # Named alone, a stage's run is itself; so is one whose partner DVC skips.
    lines = epoch_lines(run(["dvc", "repro", "--force", "-s", "train_cond"], project).stdout)
    assert [line.split("; ")[1].split(",")[0] for line in lines] == [
        "run 50% of 8 steps (train_cond)",
        "run 100% of 8 steps (train_cond)",
    ], lines
    lines = epoch_lines(run(["dvc", "repro", "--force", "train_uncond"], project).stdout)
    assert all("of 8 steps (train_uncond)" in line for line in lines) and len(lines) == 2, lines

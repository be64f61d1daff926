"""The run-wide progress line: every optimizer step that one pipeline execution trains.

A training stage shows two lines while it runs: the whole of the run's training on top
(both models where DVC trains both, the steps already done by an earlier stage of the
same execution counted in), with the time left at the rate of this stage, and the
current epoch below it, as before. Which trainings a run has is the stage's to say
(stages/common.py reads DVC's view of it); this module only draws and counts.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

from tqdm import tqdm


@dataclass(frozen=True)
class RunPlan:
    """The trainings of one execution, in the order they run: (stage, optimizer steps),
    and which of them is this one."""

    trainings: tuple[tuple[str, int], ...]
    current: str

    def __post_init__(self) -> None:
        names = [name for name, _ in self.trainings]
        if self.current not in names:
            raise ValueError(f"{self.current!r} is not one of the run's trainings {names}")

    @property
    def total_steps(self) -> int:
        return sum(steps for _, steps in self.trainings)

    @property
    def steps_before(self) -> int:
        """Steps of the trainings that ran before this one."""
        done = 0
        for name, steps in self.trainings:
            if name == self.current:
                return done
            done += steps
        raise AssertionError("unreachable: __post_init__ checked `current`")

    def label(self) -> str:
        """`run (train_uncond → train_cond)`: what the line counts."""
        return "run (" + " → ".join(name for name, _ in self.trainings) + ")"


class RunProgress:
    """The run's steps, `plan.total_steps`, counted from those done before this stage (and
    before a resumed epoch), and the time left at this stage's rate. On a terminal it is
    a live line above the epoch's; `summary()` puts the same on each epoch's printed line,
    which is all a log file (a queued experiment, CI) gets."""

    def __init__(self, plan: RunPlan, done_in_stage: int = 0, live: bool = True):
        self.plan = plan
        self.done = self.started_at = plan.steps_before + done_in_stage
        self.started = time.perf_counter()
        self.bar = tqdm(
            total=plan.total_steps,
            initial=self.done,
            desc=plan.label(),
            unit="step",
            position=0,
            mininterval=1.0,
            dynamic_ncols=True,
            disable=not live,
        )

    @property
    def live(self) -> bool:
        return not self.bar.disable

    def advance(self, steps: int) -> None:
        self.done += steps
        self.bar.update(steps)

    def seconds_left(self) -> float | None:
        """At the mean rate of this stage so far; None before its first step."""
        stepped = self.done - self.started_at
        if stepped <= 0:
            return None
        return (self.plan.total_steps - self.done) * (time.perf_counter() - self.started) / stepped

    def summary(self) -> str:
        """`run 17% of 60 steps (train_uncond → train_cond), 0:00:18 left`."""
        left = self.seconds_left()
        eta = "" if left is None else f", {datetime.timedelta(seconds=round(left))} left"
        share = 100 * self.done / max(1, self.plan.total_steps)
        trainings = " → ".join(name for name, _ in self.plan.trainings)
        return f"run {share:.0f}% of {self.plan.total_steps} steps ({trainings}){eta}"

    def close(self) -> None:
        self.bar.close()

"""Stages train_uncond and train_cond: train a diffusion model on `data.dataset`
(data/dataset, from fetch_data).

Writes the EMA weights to models/<kind>.pt (a state_dict; load it with
torch.load(path, weights_only=True)), the EMA weights at `train.guide_at` of the training
steps to models/<kind>_guide.pt (autoguidance's guide: an earlier, worse version of the
same model, free since it is a snapshot of the same run), the loss curve to reports/loss_<kind>.csv (step,
epoch, loss: one row every `train.log_every` optimizer steps and at each epoch's end) and
a summary to reports/train_<kind>.json. Logs params, that curve with lr, gradient norm,
images/s and the ε-loss by noise level, the per-epoch mean loss, and a sample grid every
`train.preview_every` steps to the stage's MLflow run, with the training set as its input
dataset. The EMA weights (with the guide) become an MLflow logged model (a pyfunc that draws images) and a
new version of the registered model ddpm-mnist-<kind>, tagged with the DVC experiment and
the git revision. An interrupted run resumes from
its last completed epoch when started again with the same params.

While it trains, a run-wide line counts the optimizer steps of every training of this
execution (both models where DVC trains both: `dvc exp run -S epochs=20`) with the time
left at this stage's rate, above the epoch's own line; each epoch's printed summary ends
with the same count and time left, which is what a log file gets.

With `train.processes` = N > 1 the stage starts N workers through torch.distributed's
elastic launcher (gloo on the CPU, NCCL with one GPU each on CUDA); started under a
user's `torchrun` it joins that world (RANK, WORLD_SIZE) instead. Rank 0 alone logs,
checkpoints and writes; the run's tag `world_size` records how many trained.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

import common
from ddpm_core import hardware
from ddpm_core.config import Params
from ddpm_core.data import ImageSet, dataset_record, load_images
from ddpm_core.distributed import World, check_processes, join, launch, leave
from ddpm_core.files import save_atomic, write_text_atomic
from ddpm_core.progress import RunPlan
from ddpm_core.tracking import registered_name
from ddpm_core.train import CURVE_COLUMNS, TrainingPlan, run_fingerprint, train_diffusion

KINDS = ("uncond", "cond")  # the order of dvc.yaml, in which DVC trains them


def run(params: Params, kind: str) -> None:
    stage = f"train_{kind}"
    conditional = kind == "cond"
    data = load_images(common.DATA, params.data.dataset, train=True, subset=params.data.train_subset)
    resume_path = common.resume_dir() / f"{stage}-{run_fingerprint(params, conditional)}.pt"
    world = World.from_environment()
    if world.size == 1 and params.train.processes > 1:
        # Start the workers through PyTorch's launcher; each runs this script again.
        check_processes(params.train.processes)
        launch(params.train.processes, [str(Path(__file__).resolve()), kind], stage)
        return
    if world.size > 1:
        device = world.device() or hardware.pick_device()
        join(world, device)
        try:
            if not world.is_main:  # rank 0 logs, checkpoints and writes; the others only train
                train_diffusion(data, params, conditional, resume_path, name=stage, device=device, world=world)
                return
            train_and_record(params, kind, data, resume_path, device, world)
        finally:
            leave()
        return
    train_and_record(params, kind, data, resume_path, None, world)


def run_plan(params: Params, kind: str, images: int) -> RunPlan:
    """The trainings of this pipeline execution as far as DVC's view tells (this one, and the
    other model's where DVC trained it already or will next), each with its steps: what the
    run-wide progress line counts."""
    stage = f"train_{kind}"
    trainings = tuple(
        (f"train_{other}", TrainingPlan.of(images, params, other == "cond").total_steps)
        for other in KINDS
        if other == kind or common.runs_in_this_execution(stage, f"train_{other}", params)
    )
    return RunPlan(trainings, stage)


def train_and_record(
    params: Params, kind: str, data: ImageSet, resume_path: Path, device: torch.device | None, world: World
) -> None:
    stage = f"train_{kind}"
    conditional = kind == "cond"
    with common.stage_run(stage, params) as run:
        run.check_registry(kind)  # a registry name clash stops us before training, not after
        run.log_dataset(
            **dataset_record(common.DATA, params.data.dataset, data, True, params.data.train_subset), context="training"
        )
        try:
            result = train_diffusion(
                data, params, conditional, resume_path, tracker=run, name=stage, device=device, world=world,
                run_plan=run_plan(params, kind, len(data)),
            )  # fmt: skip
        except KeyboardInterrupt:
            if resume_path.exists():
                print(
                    f"{stage}: stopped; `dvc repro` resumes from the last completed epoch, saved in {resume_path}",
                    file=sys.stderr,
                )
            raise
        plan = TrainingPlan.of(len(data), params, conditional)
        weights, guide = Path("models") / f"{kind}.pt", Path("models") / f"{kind}_guide.pt"
        save_atomic(result.snapshots[plan.guide_step], guide)
        save_atomic(result.ema_state_dict, weights)
        rows = "".join(f"{row['step']},{row['epoch']},{row['loss']:.6f}\n" for row in result.curve)
        write_text_atomic(Path("reports") / f"loss_{kind}.csv", ",".join(CURVE_COLUMNS) + "\n" + rows)
        summary = {
            "final_loss": result.losses[-1],
            "images_per_s": sum(result.images_per_s) / len(result.images_per_s),
            "train_seconds": sum(result.epoch_seconds),
            "steps": plan.total_steps,
            "guide_step": plan.guide_step,
        }
        write_text_atomic(Path("reports") / f"train_{kind}.json", json.dumps(summary, indent=2) + "\n")
        # "images_per_s" is a curve; the run's mean gets its own key.
        run.log_metrics(
            {
                "final_loss": summary["final_loss"],
                "train_seconds": summary["train_seconds"],
                "mean_images_per_s": summary["images_per_s"],
            }
        )
        run.set_tags(
            {
                "precision": result.precision,
                "device": result.device,
                "resumed_after_epoch": result.resumed_after_epoch,
                "world_size": world.size,  # training processes (train.processes, or torchrun's WORLD_SIZE)
            }
        )
        run.log_artifact(weights, "checkpoint")
        run.log_artifact(guide, "checkpoint")
        model_id, version = run.log_model(
            kind, weights, common.stage_keys(stage, params), common.model_version_tags(params), guide=guide
        )
        print(f"{stage}: logged model {model_id}, registered as models:/{registered_name(kind)}/{version}", flush=True)
    resume_path.unlink(missing_ok=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["uncond", "cond"], help="unconditional or class-conditional model")
    args = parser.parse_args()
    common.main(lambda params: run(params, args.kind))

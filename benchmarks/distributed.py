"""Training in 1, 2, ... processes (torch.distributed, gloo on the CPU): images/s, and how far
the loss curve and the weights of N processes move from those of one.

    python benchmarks/distributed.py                       # 1 and 2 processes, 6,400 images
    python benchmarks/distributed.py --processes 1 2 --images 60000 --model cond

Trains params.yaml's model (the class-conditional one by default) for one epoch on the
first --images MNIST training images with the pipeline's own `train_diffusion`, once per
process count, each worker with cores / N intra-op threads, and prints one row per count:
wall seconds of the training loop, images/s, the mean loss of the epoch, and against one
process the largest and the mean difference of the logged loss points and the largest
difference of the EMA weights. docs/cluster.md has its output. MNIST comes from
data/dataset (after `dvc repro fetch_data`) or from DDPM_DATA_MIRROR.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ddpm_core.config import Params, load_params  # noqa: E402
from ddpm_core.data import fetch, load_images  # noqa: E402
from ddpm_core.distributed import World, join, leave, run_local  # noqa: E402
from ddpm_core.hardware import cpu_flags, resolve_precision  # noqa: E402
from ddpm_core.train import train_diffusion  # noqa: E402


def _worker(rank: int, size: int, port: int, job: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(job["threads"])
    world = World(rank, size, rank)
    cpu = torch.device("cpu")
    join(world, cpu)
    try:
        data = load_images(job["data"], job["params"].data.dataset, subset=job["images"])
        started = time.perf_counter()
        run = train_diffusion(
            data, job["params"], job["cond"], job["resume"], device=cpu, world=world, name=f"N={size}"
        )
        seconds = time.perf_counter() - started
        if world.is_main:
            with open(job["out"], "wb") as f:
                pickle.dump({"seconds": seconds, "run": run}, f)
    finally:
        leave()


def train(size: int, params: Params, job: dict, folder: Path) -> dict:
    cores = len(os.sched_getaffinity(0))
    job = {**job, "params": params, "threads": max(1, cores // size), "out": folder / f"{size}.pkl",
           "resume": folder / f"resume-{size}.pt"}  # fmt: skip
    run_local(_worker, size, job)
    with open(job["out"], "rb") as f:
        return pickle.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=6400, help="first N training images (one epoch)")
    parser.add_argument("--model", choices=["cond", "uncond"], default="cond")
    args = parser.parse_args()

    params = load_params(ROOT / "params.yaml")
    params = params.model_copy(
        update={"epochs": 1, "data": params.data.model_copy(update={"train_subset": args.images})}
    )
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        data = ROOT / "data" / "dataset"
        if not data.exists():
            data = folder / "dataset"
            mirror = os.environ.get("DDPM_DATA_MIRROR")
            fetch(params.data.dataset, data, Path(mirror) if mirror else None)
        precision = resolve_precision(params.train.precision, torch.device("cpu"))
        print(f"CPU flags: {' '.join(cpu_flags())}; {len(os.sched_getaffinity(0))} cores; precision {precision}; "
              f"torch {torch.__version__}; {args.images} images, batch {params.train.batch_size}, {args.model} model")  # fmt: skip
        job = {"data": data, "images": args.images, "cond": args.model == "cond"}
        results = {}
        print(f"{'processes':>9} {'seconds':>8} {'images/s':>9} {'epoch loss':>10} {'max Δ loss point':>16} "
              f"{'mean Δ loss point':>17} {'max Δ EMA weight':>16}")  # fmt: skip
        for size in args.processes:
            results[size] = train(size, params, job, folder)
            run, base = results[size]["run"], results[args.processes[0]]["run"]
            deltas = [abs(a["loss"] - b["loss"]) for a, b in zip(run.curve, base.curve, strict=True)]
            weights = max(
                (run.ema_state_dict[k].float() - v.float()).abs().max().item() for k, v in base.ema_state_dict.items()
            )
            seconds = results[size]["seconds"]
            print(f"{size:>9} {seconds:>8.1f} {args.images / seconds:>9.1f} {run.losses[-1]:>10.5f} "
                  f"{max(deltas):>16.2e} {sum(deltas) / len(deltas):>17.2e} {weights:>16.2e}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

"""Speed and memory of training and sampling on this machine, printed as tables.

    make bench                                  # = the command below, in .venv with the bench extra
    python benchmarks/benchmark.py              # all rows, about 5 minutes on 2 CPU cores
    python benchmarks/benchmark.py --quick      # fewer steps per row, about 3 minutes
    python benchmarks/benchmark.py --avx2       # the rows as a laptop without AVX-512 would run them

The header names the CPU, the flags that decide the path (AVX2, AVX-512, native bf16)
and the precision and memory layout the pipeline takes on this machine.

Training rows: images/s and peak memory of one optimisation step as the pipeline takes
it (ddpm_core.train.train_step: the pipeline's loss, AdamW, clipping, EMA) for this project's U-Net
(`model` in params.yaml) and for a diffusers UNet2DModel with the same widths, blocks per
level and attention at the lowest resolution, both class-conditional, in fp32 and under
bf16 autocast. Sampling rows: images/s of each sampler and step count at the pipeline's
sample batch size, with classifier-free guidance (two network passes per step in one
batch) and without it, in fp32 and under bf16 autocast. The weights are random: speed
does not depend on them.

Each row runs in its own subprocess, so its peak memory (the process's max RSS, or
torch.cuda.max_memory_allocated on a GPU) is its own and includes Python and torch
(about 0.4 GB on the CPU). The diffusers rows need `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ddpm_core import hardware  # noqa: E402
from ddpm_core.config import Params, load_params  # noqa: E402
from ddpm_core.data import NUM_CLASSES  # noqa: E402
from ddpm_core.environment import software_versions  # noqa: E402
from ddpm_core.samplers import make_sampler, sample  # noqa: E402
from ddpm_core.schedule import make_schedule  # noqa: E402
from ddpm_core.train import Objective, Optimization, train_step  # noqa: E402
from ddpm_core.unet import build_unet  # noqa: E402


class DiffusersEps(nn.Module):
    """diffusers' UNet2DModel behind ddpm_core's ε_θ(x, t, labels) signature."""

    def __init__(self, channels: list[int], blocks_per_level: int, heads: int):
        super().__init__()
        from diffusers import UNet2DModel as untyped

        UNet2DModel: Any = untyped  # diffusers' own annotations make mypy call the class "not callable"

        down = ["DownBlock2D"] * (len(channels) - 1) + ["AttnDownBlock2D"]
        self.net = UNet2DModel(
            sample_size=28, in_channels=1, out_channels=1,
            block_out_channels=tuple(channels), layers_per_block=blocks_per_level,
            down_block_types=tuple(down), up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
            attention_head_dim=channels[-1] // heads, norm_num_groups=8, num_class_embeds=NUM_CLASSES + 1,
        )  # fmt: skip

    def forward(self, x, t, labels=None):
        return self.net(x, t, class_labels=labels).sample


def build_model(impl: str, params: Params) -> nn.Module:
    if impl == "ddpm_core":
        return build_unet(params.model, NUM_CLASSES)
    m = params.model
    return DiffusersEps(list(m.channels), m.blocks_per_level, m.attention_heads)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_training(spec: dict, params: Params, device: torch.device) -> dict:
    precision = spec["precision"]
    model = hardware.place_model(build_model(spec["impl"], params), device, precision)
    opt = Optimization.build(model, params.train, total_steps=10**6, precision=precision, device=device)
    schedule = make_schedule(params.diffusion.schedule, params.diffusion.timesteps)
    autocast = hardware.autocast_factory(precision, device)
    generator = torch.Generator().manual_seed(0)
    bs = params.train.batch_size
    x0 = (torch.rand((bs, 1, 28, 28), generator=generator) * 2 - 1).to(device)
    labels = torch.randint(0, NUM_CLASSES + 1, (bs,), generator=generator).to(device)

    def run(steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            stats = train_step(opt, schedule, x0, labels, generator, autocast, Objective.of(params))
        stats.terms.loss.item()  # wait for the device
        return time.perf_counter() - started

    run(spec["warmup"])
    seconds = run(spec["steps"])
    return {
        "images_per_s": spec["steps"] * bs / seconds,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "peak_mb": peak_memory_mb(device),
    }


def measure_sampling(spec: dict, params: Params, device: torch.device) -> dict:
    model = (
        hardware.place_model(build_unet(params.model, NUM_CLASSES), device, spec["precision"])
        .eval()
        .requires_grad_(False)
    )
    schedule = make_schedule(params.diffusion.schedule, params.diffusion.timesteps)
    sampler = make_sampler(
        spec["sampler"],
        schedule,
        spec["steps"],
        0.0,
        params.diffusion.prediction,
        offset_noise=params.diffusion.offset_noise,
    )  # t_min costs nothing
    total_steps = len(sampler.timesteps)
    if spec["timed_steps"] < total_steps:
        sampler.timesteps = sampler.timesteps[: spec["timed_steps"]]  # each step costs the same
    autocast = hardware.autocast_factory(spec["precision"], device)
    bs = params.sample.batch_size
    labels = torch.arange(bs) % NUM_CLASSES
    generator = torch.Generator().manual_seed(0)
    sample(
        model,
        make_sampler("ddim", schedule, 1, 0.0, params.diffusion.prediction, offset_noise=params.diffusion.offset_noise),
        (bs, 1, 28, 28),
        generator,
        labels,
        spec["guidance"],
        device,
        autocast,
    )
    started = time.perf_counter()
    sample(model, sampler, (bs, 1, 28, 28), generator, labels, spec["guidance"], device, autocast)
    seconds = (time.perf_counter() - started) * total_steps / len(sampler.timesteps)
    return {
        "images_per_s": bs / seconds,
        "peak_mb": peak_memory_mb(device),
        "extrapolated": len(sampler.timesteps) < total_steps,
    }


def child(spec: dict) -> None:
    hardware.configure_threads()
    params = load_params(ROOT / "params.yaml")
    device = hardware.pick_device()
    measure = measure_training if spec["kind"] == "train" else measure_sampling
    print(json.dumps(measure(spec, params, device)))


def run_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def versions() -> str:
    return ", ".join(f"{name} {v}" for name, v in software_versions(("torch", "diffusers")).items())


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as info:
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    bf16 = "native bf16" if hardware.cpu_has_native_bf16() else "no native bf16 (emulated)"
    return f"{cpu}, {os.cpu_count()} cores, {bf16}; CPU flags: {' '.join(hardware.cpu_flags()) or 'none read'}"


def pipeline_path(params: Params, device: torch.device) -> str:
    """The precision and layout the pipeline takes here, and what decided it."""
    precision = hardware.resolve_precision(params.train.precision, device)
    layout = "channels-last" if device.type == "cuda" or precision == "fp32" else "NCHW"
    if device.type != "cpu":
        why = f"device {device}"
    elif precision == "bf16":
        why = "native bf16 (avx512_bf16 or amx_bf16 in the CPU flags)"
    else:
        why = "no native bf16 in the CPU flags: emulated bf16 would be slower than fp32"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA")
    capped = f"; vector ISA capped at {isa} for this run" if isa else ""
    return f"train.precision {params.train.precision} -> {precision}, {layout} ({why}){capped}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed steps per row")
    parser.add_argument(
        "--avx2", action="store_true",
        help="cap oneDNN and ATen at AVX2 in the timed rows (ONEDNN_MAX_CPU_ISA=AVX2, ATEN_CPU_CAPABILITY=avx2): "
        "an AVX-512 machine then times the fp32 path of a laptop without AVX-512 or native bf16",
    )  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if args.avx2:
        os.environ.update(ONEDNN_MAX_CPU_ISA="AVX2", ATEN_CPU_CAPABILITY="avx2")  # inherited by each row's process

    import pandas as pd

    params = load_params(ROOT / "params.yaml")
    device = hardware.pick_device()
    threads = hardware.configure_threads()
    print(f"machine: {machine()}; device {device}, {threads} torch threads")
    print(f"pipeline path: {pipeline_path(params, device)}")
    print(f"versions: {versions()}")
    print(f"model: channels {list(params.model.channels)}, {params.model.blocks_per_level} block(s) per level; "
          f"train batch {params.train.batch_size}, sample batch {params.sample.batch_size}\n")  # fmt: skip

    # About 1,500 timed images per row (500 with --quick), whatever the batch size.
    steps = max(2, (512 if args.quick else 1536) // params.train.batch_size)
    rows = []
    for impl in ("ddpm_core", "diffusers"):
        for precision in ("fp32", "bf16"):
            spec: dict[str, object] = {
                "kind": "train",
                "impl": impl,
                "precision": precision,
                "warmup": 3,
                "steps": steps,
            }
            print(f"training {impl} {precision} …", file=sys.stderr, flush=True)
            rows.append({"model": impl, "precision": precision, **run_child(spec)})
    train = pd.DataFrame(rows)
    if "images_per_s" in train:
        ours = train[train.model == "ddpm_core"].set_index("precision")["images_per_s"]
        train["ddpm_core / this"] = train.apply(lambda r: ours.get(r.precision) / r.images_per_s, axis=1)
    print("Training (one step = loss, backward, clip, AdamW, EMA; conditional; images/s)")
    print(train.round(2).to_string(index=False), "\n")

    samplers = [("ddim", 10), ("ddim", 20), ("ddim", 50), ("dpmpp2m", 10), ("dpmpp2m", 20), ("ddpm", 1000)]
    rows = []
    for name, n in samplers:
        for guidance in (1.0, params.sample.guidance):
            for precision in ("fp32", "bf16"):
                timed = min(n, 3) if args.quick else (n if n <= 20 else 10)
                spec = {
                    "kind": "sample",
                    "sampler": name,
                    "steps": n,
                    "guidance": guidance,
                    "precision": precision,
                    "timed_steps": timed,
                }
                print(f"sampling {name} {n} steps, guidance {guidance} {precision} …", file=sys.stderr, flush=True)
                rows.append(
                    {"sampler": name, "steps": n, "guidance": guidance, "precision": precision, **run_child(spec)}
                )
    print("Sampling (class-conditional model; guidance 1 is one network pass per step, otherwise two in one batch)")
    print(pd.DataFrame(rows).round(1).to_string(index=False))


if __name__ == "__main__":
    main()

"""Training images/s of one optimisation step for a precision, batch size and U-Net width.

    python benchmarks/throughput.py bf16 32 '[32, 64, 128]'     # prints one line
    python benchmarks/throughput.py fp32 32 '[64, 128]' 2 2     # + model.patch_size, blocks_per_level

Everything else as params.yaml says (the pipeline's train_step: loss, AdamW, clipping,
EMA); random data, since speed does not depend on it. docs/performance.md has the table
it made (issue 14: where training time goes).
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ddpm_core import hardware  # noqa: E402
from ddpm_core.config import load_params  # noqa: E402
from ddpm_core.data import NUM_CLASSES  # noqa: E402
from ddpm_core.schedule import make_schedule  # noqa: E402
from ddpm_core.train import Objective, Optimization, train_step  # noqa: E402
from ddpm_core.unet import build_unet  # noqa: E402

hardware.configure_threads()
base = load_params(ROOT / "params.yaml")
prec, bs, ch = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
patch = int(sys.argv[4]) if len(sys.argv) > 4 else base.model.patch_size
blocks = int(sys.argv[5]) if len(sys.argv) > 5 else base.model.blocks_per_level
params = base.model_copy(
    update={
        "model": base.model.model_copy(update={"channels": ch, "patch_size": patch, "blocks_per_level": blocks}),
        "train": base.train.model_copy(update={"batch_size": bs}),
    }
)
dev = torch.device("cpu")
model = hardware.place_model(build_unet(params.model, NUM_CLASSES), dev, prec)
opt = Optimization.build(model, params.train, total_steps=10**6, precision=prec, device=dev)
sched = make_schedule(params.diffusion.schedule, params.diffusion.timesteps)
ac = hardware.autocast_factory(prec, dev)
g = torch.Generator().manual_seed(0)
x0 = torch.rand((bs, 1, 28, 28), generator=g) * 2 - 1
y = torch.randint(0, NUM_CLASSES + 1, (bs,), generator=g)


def run(steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        stats = train_step(opt, sched, x0, y, g, ac, Objective.of(params))
    stats.terms.loss.item()
    return time.perf_counter() - started


run(3)
n = max(8, 1024 // bs)
seconds = run(n)
size = sum(p.numel() for p in model.parameters()) / 1e6
print(
    f"{prec} bs={bs} ch={ch} patch={patch} blocks={blocks}: {n * bs / seconds:.0f} img/s, {size:.2f} M params",
    flush=True,
)

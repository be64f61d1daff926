"""Seeds and random-number-generator state: everything random derives from one seed."""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch, turn on deterministic algorithms, and return a CPU
    generator from which the caller draws its own noise, batches and timesteps."""
    # cuBLAS needs this set before its first call to be deterministic.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


def rng_state(generator: torch.Generator) -> dict:
    """Every RNG state a training run touches, for a checkpoint."""
    state = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_as_tensors(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state_as_tensors() -> tuple:
    # torch.load(weights_only=True) refuses numpy arrays; the key array travels as a tensor.
    state = np.random.get_state(legacy=True)
    assert isinstance(state, tuple)  # legacy=True: (name, keys, pos, has_gauss, cached)
    name, keys, pos, has_gauss, cached = state
    return (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)


def restore_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def derived_seed(seed: int, purpose: str) -> int:
    """A seed for one purpose ("sample/cond", …), fixed by `seed`, independent of others."""
    digest = hashlib.sha256(f"{seed}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1

"""The environment variables the project reads, what each accepts, and one check of all
of them where a command starts (stages/common.main, `ddpm`, the MLflow pyfunc).

The modules that use a variable (hardware, distributed) read it as they always have;
this check runs first, so a wrong value ends as one line naming the variable and what
it accepts (exit 2) instead of a traceback from deep inside PyTorch or libgomp.
"""

from __future__ import annotations

import os

import torch

from ddpm_core.errors import ConfigError

MAX_THREADS = 1024

# name → what it accepts (the message of a wrong value)
ACCEPTED = {
    "DDPM_DEVICE": "cpu, cuda, cuda:N (N a GPU index) or mps",
    "DDPM_THREADS": f"a whole number of threads from 1 to {MAX_THREADS}",
    "OMP_NUM_THREADS": f"a whole number of threads from 1 to {MAX_THREADS}",
    "DDPM_CPU_BF16": "0 (fp32 on the CPU) or 1 (bf16 autocast)",
}


def _refuse(name: str, value: str, why: str = "not accepted") -> ConfigError:
    return ConfigError(f"{name}={value!r}: {why}; accepted: {ACCEPTED[name]}")


def check_device(value: str) -> None:
    """DDPM_DEVICE names a device kind PyTorch has and this machine has one of."""
    kind, colon, index = value.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (colon and (kind != "cuda" or not index.isdigit())):
        raise _refuse("DDPM_DEVICE", value)
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(index or 0) >= count:
            raise _refuse("DDPM_DEVICE", value, f"this machine has {count} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise _refuse("DDPM_DEVICE", value, "Apple's MPS is not available on this machine")


def check_threads(name: str, value: str) -> None:
    if not (value.isdigit() and 1 <= int(value) <= MAX_THREADS):
        raise _refuse(name, value)


def check_environment(environ: dict[str, str] | None = None) -> None:
    """Every variable of `ACCEPTED` that is set (to a non-empty value), checked; a wrong
    one is a ConfigError naming it and what it accepts."""
    environ = dict(os.environ) if environ is None else environ
    for name in ACCEPTED:
        value = environ.get(name, "")
        if not value:
            continue
        if name == "DDPM_DEVICE":
            check_device(value)
        elif name in ("DDPM_THREADS", "OMP_NUM_THREADS"):
            check_threads(name, value)
        elif value not in ("0", "1"):
            raise _refuse(name, value)

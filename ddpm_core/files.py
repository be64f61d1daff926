"""Writing outputs atomically (never a half-written file) and loading checkpoints safely."""

from __future__ import annotations

import io
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ddpm_core.errors import CheckpointError


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def write_atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(f)` on a temporary file beside `path`, then rename it to `path`: a crash
    or a full disk never leaves a truncated file under the final name."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(obj: Any, path: Path) -> None:
    """`torch.save` through `write_atomic`. Serialised in memory first: torch's writer
    turns a full disk into an opaque RuntimeError, a plain write into ENOSPC."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, lambda f: f.write(buffer.getbuffer()))


def write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def load_safe(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers only, never code."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused, not a plain weights file ({first})") from None
    except (RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({exc})") from None

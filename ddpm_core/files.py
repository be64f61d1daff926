"""Writing outputs atomically (never a half-written file), loading checkpoints safely, and
reading what another stage wrote with errors that name the file and what to rerun."""

from __future__ import annotations

import io
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ddpm_core.errors import CheckpointError, DataError


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


def load_safe(path: Path, map_location: str | torch.device = "cpu", remedy: str = "") -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers only, never code.
    `remedy` (what to rerun) ends the message of a CheckpointError."""
    path = Path(path)
    then = f"; {remedy}" if remedy else ""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found{then}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: a folder, not a checkpoint{then}") from None
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused, not a plain weights file ({first}){then}") from None
    except (RuntimeError, EOFError, ValueError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0].split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({first}){then}") from None


def _shape(tensor: torch.Tensor) -> str:
    return "×".join(map(str, tensor.shape)) or "a scalar"


def load_state_checked(model: torch.nn.Module, state: Any, name: str, what: str, remedy: str) -> None:
    """Load `state` (read from the file `name`) into `model`, having checked that it is a
    state_dict of `model`'s architecture with finite weights; otherwise a CheckpointError:
    "<name>: not <what> (the first difference); <remedy>". Nothing of `model` changes then."""
    if not (
        isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise CheckpointError(f"{name}: not a state_dict of tensors ({type(state).__name__}); {remedy}")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"no {missing[0]}" + (f" and {len(missing) - 1} more missing" if len(missing) > 1 else ""))
        if unexpected:
            extra = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
            parts.append(f"an unexpected {unexpected[0]}{extra}")
        raise CheckpointError(f"{name}: not {what} ({', '.join(parts)}); {remedy}")
    for key, tensor in expected.items():
        found = state[key]
        if found.shape != tensor.shape:
            raise CheckpointError(f"{name}: not {what} ({key} is {_shape(found)}, expected {_shape(tensor)}); {remedy}")
        if found.is_floating_point() and not bool(torch.isfinite(found).all()):
            raise CheckpointError(f"{name}: {key} holds NaN or infinite weights; {remedy}")
    model.load_state_dict(state)


class Report(dict):
    """A JSON object read by `read_json`: a missing key is a DataError naming the file,
    the key and what to rerun, not a KeyError from deep inside a figure."""

    def __init__(self, data: dict, name: str, remedy: str):
        super().__init__({k: _wrap(v, name, remedy) for k, v in data.items()})
        self.name, self.remedy = name, remedy

    def __missing__(self, key: str) -> Any:
        raise DataError(f"{self.name}: no {key!r} in it; {self.remedy}")


def _wrap(value: Any, name: str, remedy: str) -> Any:
    if isinstance(value, dict):
        return Report(value, name, remedy)
    if isinstance(value, list):
        return [_wrap(v, name, remedy) for v in value]
    return value


def read_json(path: Path, remedy: str) -> Report:
    """A JSON object another stage wrote; missing, unreadable, not an object, or (later)
    without a key the reader needs: a DataError naming `path` and `remedy`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not found; {remedy}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({str(exc).splitlines()[0]}); {remedy}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: a JSON {type(data).__name__}, expected an object; {remedy}")
    return Report(data, str(path), remedy)


def read_table(path: Path, columns: tuple[str, ...], remedy: str) -> Any:
    """A CSV another stage wrote, as a pandas DataFrame with at least `columns`; missing,
    unreadable or without one of them: a DataError naming `path` and `remedy`."""
    import pandas as pd

    path = Path(path)
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise DataError(f"{path}: not found; {remedy}") from None
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: not a readable CSV ({first}); {remedy}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: no column {', '.join(missing)} (it has {', '.join(map(str, frame.columns))}); {remedy}"
        )
    return frame

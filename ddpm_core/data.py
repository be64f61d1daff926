"""MNIST: fetch it (from a local mirror or through torchvision), verify it, load it.

The files land in torchvision's layout, `<root>/MNIST/raw/<name>` uncompressed, so that
`torchvision.datasets.MNIST(root)` reads them as well. Every file is checked against
the MD5 of the official uncompressed release, whatever its source.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from ddpm_core.errors import DataError

NUM_CLASSES = 10

# MD5 of the official uncompressed IDX files (they match ../shared/data/mnist/MD5SUMS.uncompressed).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}


def raw_folder(root: Path) -> Path:
    return Path(root) / "MNIST" / "raw"


def _gunzip(source: Path) -> bytes:
    try:
        with gzip.open(source, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{source}: file not found") from None
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{source}: not a complete gzip file ({exc})") from None


def _verified(name: str, content: bytes, source: Path) -> bytes:
    digest = hashlib.md5(content).hexdigest()
    if digest != MNIST_MD5[name]:
        raise DataError(f"{source}: MD5 of the uncompressed content is {digest}, expected {MNIST_MD5[name]}")
    return content


def _from_mirror(mirror: Path, staging: Path) -> None:
    if not mirror.is_dir():
        raise DataError(f"{mirror}: DDPM_DATA_MIRROR is not a folder")
    for name in MNIST_MD5:
        source = mirror / f"{name}.gz"
        (staging / name).write_bytes(_verified(name, _gunzip(source), source))


def _from_torchvision(staging: Path) -> None:
    download_root = staging.parent / "download"
    torchvision.datasets.MNIST(download_root, train=True, download=True)
    torchvision.datasets.MNIST(download_root, train=False, download=True)
    for name in MNIST_MD5:
        source = raw_folder(download_root) / name
        (staging / name).write_bytes(_verified(name, source.read_bytes(), source))


def fetch_mnist(root: Path, mirror: Path | None = None) -> Path:
    """Put verified MNIST under `root/MNIST/raw` and return that folder.

    Reads the four `.gz` files from `mirror` when given, otherwise downloads through
    torchvision. Files are staged in a temporary folder beside the destination and
    moved in place only when all four are verified: a failure leaves nothing behind.
    """
    dest = raw_folder(root)
    try:
        dest.parent.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent.parent, prefix=".fetch-") as tmp:
            staging = Path(tmp) / "raw"
            staging.mkdir()
            if mirror is not None:
                _from_mirror(Path(mirror), staging)
            else:
                _from_torchvision(staging)
            if dest.parent.exists():
                shutil.rmtree(dest.parent)
            dest.parent.mkdir()
            staging.rename(dest)
    except OSError as exc:
        root = dest.parent.parent
        # A failure inside the hidden staging folder is a failure to write `root`: name that.
        where = exc.filename if exc.filename and root.resolve() not in Path(exc.filename).resolve().parents else root
        raise DataError(f"{where}: cannot write the dataset ({exc.strerror or exc}); nothing was kept") from None
    return dest


@dataclass(frozen=True)
class ImageSet:
    """Images as one uint8 tensor (N, 1, 28, 28) and their int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()


def load_mnist(root: Path, train: bool = True, subset: int | None = None) -> ImageSet:
    """The first `subset` images of the split (all if None), held in memory."""
    if not raw_folder(root).is_dir():
        raise DataError(f"{raw_folder(root)}: no MNIST here; run the fetch_data stage first")
    ds = torchvision.datasets.MNIST(root, train=train, download=False)
    images, labels = ds.data, ds.targets
    if subset is not None:
        images, labels = images[:subset], labels[:subset]
    return ImageSet(images.unsqueeze(1).contiguous(), labels.long())


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [−1, 1]."""
    return images.float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [−1, 1] → uint8 [0, 255], rounding to the nearest level."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

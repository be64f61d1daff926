"""The datasets (MNIST, Fashion-MNIST): fetch one, verify it, load it.

The files land in torchvision's layout, `<root>/<MNIST or FashionMNIST>/raw/<name>`
uncompressed, so that `torchvision.datasets.MNIST(root)` (or `FashionMNIST`) reads them
as well. Every file is checked against the MD5 of the official uncompressed release,
whatever its source: DDPM_DATA_MIRROR, a distribution's package, or torchvision's download.
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

NUM_CLASSES = 10  # both datasets

# MD5 of the official uncompressed IDX files (they match ../shared/data/mnist/MD5SUMS.uncompressed).
MNIST_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

# Fashion-MNIST publishes MD5s of its .gz files only (torchvision's FashionMNIST.resources).
# These are of their uncompressed content; Debian's dataset-fashion-mnist holds the same
# deflate streams with the file name dropped from the gzip header, hence other .gz MD5s.
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}


@dataclass(frozen=True)
class Dataset:
    title: str  # for messages
    torchvision_class: type[torchvision.datasets.MNIST]
    md5: dict[str, str]  # file name → MD5 of its official uncompressed content
    system_folder: Path | None = None  # where a distribution's package puts the .gz files

    @property
    def folder(self) -> str:
        """torchvision's folder name under the root: MNIST, FashionMNIST."""
        return self.torchvision_class.__name__


DATASETS = {
    "mnist": Dataset("MNIST", torchvision.datasets.MNIST, MNIST_MD5),
    "fashion-mnist": Dataset(
        "Fashion-MNIST", torchvision.datasets.FashionMNIST, FASHION_MNIST_MD5, Path("/usr/share/datasets/fashion-mnist")
    ),
}


def raw_folder(root: Path, dataset: str) -> Path:
    return Path(root) / DATASETS[dataset].folder / "raw"


def _gunzip(source: Path) -> bytes:
    try:
        with gzip.open(source, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise DataError(f"{source}: file not found") from None
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{source}: not a complete gzip file ({exc})") from None


def _identify(name: str, digest: str) -> str | None:
    """The dataset whose file `name` has this MD5, if any."""
    return next((key for key, ds in DATASETS.items() if ds.md5[name] == digest), None)


def _mismatch(dataset: Dataset, name: str, digest: str, source: Path) -> DataError:
    return DataError(f"{source}: MD5 of the uncompressed content is {digest}, expected {dataset.md5[name]}")


def _from_folder(folder: Path, dataset: Dataset, staging: Path) -> str | None:
    """Verify the four .gz files of `folder` into `staging`. When its first file is,
    by checksum, another dataset's, return that dataset's key and copy nothing."""
    for i, (name, md5) in enumerate(dataset.md5.items()):
        source = folder / f"{name}.gz"
        content = _gunzip(source)
        digest = hashlib.md5(content).hexdigest()
        if digest != md5:
            other = _identify(name, digest)
            if i == 0 and other is not None:
                return other
            raise _mismatch(dataset, name, digest, source)
        (staging / name).write_bytes(content)
    return None


def _from_torchvision(dataset: Dataset, staging: Path) -> None:
    download_root = staging.parent / "download"
    try:
        dataset.torchvision_class(download_root, train=True, download=True)
        dataset.torchvision_class(download_root, train=False, download=True)
    except (RuntimeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.filename:
            raise  # a local file could not be written: fetch() names it
        reason = " ".join(str(exc).split()) or type(exc).__name__  # torchvision's has a line per mirror
        raise DataError(
            f"{dataset.title}: the torchvision download failed ({reason}); "
            "set DDPM_DATA_MIRROR to a folder holding the four .gz files"
            + (f", or install them into {dataset.system_folder}" if dataset.system_folder else "")
        ) from None
    for name, md5 in dataset.md5.items():
        source = download_root / dataset.folder / "raw" / name
        content = source.read_bytes()
        digest = hashlib.md5(content).hexdigest()
        if digest != md5:
            raise _mismatch(dataset, name, digest, source)
        (staging / name).write_bytes(content)


def _fill(dataset_key: str, mirror: Path | None, staging: Path) -> str:
    """Put the verified files into `staging` from the first source that has them; say which."""
    dataset = DATASETS[dataset_key]
    if mirror is not None:
        if not mirror.is_dir():
            raise DataError(f"{mirror}: DDPM_DATA_MIRROR is not a folder")
        other = _from_folder(mirror, dataset, staging)
        if other is None:
            return str(mirror)
        print(
            f"note: DDPM_DATA_MIRROR {mirror} holds {DATASETS[other].title}, not {dataset.title}; trying the next source"
        )
    if dataset.system_folder is not None and dataset.system_folder.is_dir():
        other = _from_folder(dataset.system_folder, dataset, staging)
        if other is None:
            return str(dataset.system_folder)
        print(
            f"note: {dataset.system_folder} holds {DATASETS[other].title}, not {dataset.title}; trying the next source"
        )
    _from_torchvision(dataset, staging)
    return "torchvision download"


def fetch(dataset: str, root: Path, mirror: Path | None = None) -> tuple[Path, str]:
    """Put the verified `dataset` under `root/<folder>/raw`; return that folder and the source.

    Sources, in order: `mirror` (DDPM_DATA_MIRROR) unless its files are, by checksum, the
    other dataset's; the dataset's system folder when present (Fashion-MNIST: Debian's
    dataset-fashion-mnist); torchvision's download. Files are staged in a temporary
    folder beside the destination and moved in place only when all four are verified:
    a failure leaves nothing behind.
    """
    dest = raw_folder(root, dataset)
    created = not dest.parent.parent.exists()
    try:
        dest.parent.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest.parent.parent, prefix=".fetch-") as tmp:
            staging = Path(tmp) / "raw"
            staging.mkdir()
            source = _fill(dataset, None if mirror is None else Path(mirror), staging)
            if dest.parent.exists():
                shutil.rmtree(dest.parent)
            dest.parent.mkdir()
            staging.rename(dest)
    except DataError:
        if created:  # nothing left behind: not even the empty root
            shutil.rmtree(dest.parent.parent, ignore_errors=True)
        raise
    except OSError as exc:
        root = dest.parent.parent
        # A failure inside the hidden staging folder is a failure to write `root`: name that.
        where = exc.filename if exc.filename and root.resolve() not in Path(exc.filename).resolve().parents else root
        raise DataError(f"{where}: cannot write the dataset ({exc.strerror or exc}); nothing was kept") from None
    return dest, source


@dataclass(frozen=True)
class ImageSet:
    """Images as one uint8 tensor (N, 1, 28, 28) and their int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()

    def digest(self) -> str:
        """SHA-256 of the image and label bytes, first 16 hex digits: equal content, equal digest."""
        h = hashlib.sha256(self.images.contiguous().numpy().tobytes())
        h.update(self.labels.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]


def dataset_record(root: Path, dataset: str, data: ImageSet, train: bool, subset: int | None) -> dict:
    """What a tracked run says of an input dataset: name (with the split and any subset),
    content digest, source folder and a profile."""
    split = "train" if train else "test"
    name = f"{dataset}-{split}" + (f"[:{subset}]" if subset is not None else "")
    profile = {"dataset": DATASETS[dataset].title, "split": split, "subset": subset, "num_images": len(data),
               "image_shape": list(data.images.shape[1:]), "num_classes": NUM_CLASSES}  # fmt: skip
    return {"name": name, "digest": data.digest(), "source": str(raw_folder(root, dataset)), "profile": profile}


def load_images(root: Path, dataset: str, train: bool = True, subset: int | None = None) -> ImageSet:
    """The first `subset` images of the split (all if None), held in memory."""
    raw = raw_folder(root, dataset)
    if not raw.is_dir():
        raise DataError(f"{raw}: no {DATASETS[dataset].title} here; run the fetch_data stage first")
    refetch = "run `dvc repro --force -s fetch_data`"
    try:
        ds = DATASETS[dataset].torchvision_class(root, train=train, download=False)
    except (RuntimeError, AssertionError, ValueError, OSError) as exc:
        # torchvision's reader of the idx files: a truncated or foreign file fails its shape
        # check (RuntimeError), its magic number (AssertionError), or is missing (OSError).
        split = "training" if train else "test"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{raw}: the {split} files are missing or damaged ({first}); {refetch}") from None
    images, labels = ds.data, ds.targets
    if len(images) != len(labels):
        raise DataError(f"{raw}: {len(images)} images but {len(labels)} labels; {refetch}")
    if subset is not None:
        images, labels = images[:subset], labels[:subset]
    return ImageSet(images.unsqueeze(1).contiguous(), labels.long())


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [−1, 1]."""
    return images.float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [−1, 1] → uint8 [0, 255], rounding to the nearest level."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

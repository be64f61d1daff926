import gzip
import hashlib
import shutil

import pytest
import torch

from conftest import MIRROR
from ddpm_core.data import MNIST_MD5, fetch, load_images, raw_folder, to_model_range, to_uint8
from ddpm_core.errors import DataError

pytestmark = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no MNIST mirror at {MIRROR}")


def test_md5s_in_code_match_the_mirror_list():
    listed = dict(
        reversed(line.split()) for line in (MIRROR / "MD5SUMS.uncompressed").read_text().splitlines() if line.strip()
    )
    assert listed == MNIST_MD5


def test_fetch_writes_torchvision_layout_with_official_content(mnist_root):
    raw = raw_folder(mnist_root, "mnist")
    assert sorted(p.name for p in raw.iterdir()) == sorted(MNIST_MD5)
    for name, md5 in MNIST_MD5.items():
        assert hashlib.md5((raw / name).read_bytes()).hexdigest() == md5
    assert not list(mnist_root.glob(".fetch-*"))


def test_load_gives_uint8_images_and_labels(mnist_root):
    train = load_images(mnist_root, "mnist", train=True)
    assert train.images.shape == (60_000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and train.labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert len(load_images(mnist_root, "mnist", train=False)) == 10_000
    subset = load_images(mnist_root, "mnist", train=True, subset=300)
    assert len(subset) == 300 and torch.equal(subset.images, train.images[:300])


def test_model_range_round_trips():
    x = torch.arange(256, dtype=torch.uint8)
    assert to_model_range(x).min() == -1 and to_model_range(x).max() == 1
    assert torch.equal(to_uint8(to_model_range(x)), x)


@pytest.fixture
def bad_mirror(tmp_path):
    mirror = tmp_path / "mirror"
    shutil.copytree(MIRROR, mirror)
    return mirror


def assert_nothing_left(root):
    assert not (root / "MNIST").exists()
    assert not list(root.glob(".fetch-*"))


def test_missing_file_is_named(bad_mirror, tmp_path):
    (bad_mirror / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: file not found"):
        fetch("mnist", tmp_path / "data", bad_mirror)
    assert_nothing_left(tmp_path / "data")


def test_truncated_file_is_named(bad_mirror, tmp_path):
    path = bad_mirror / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: not a complete gzip file"):
        fetch("mnist", tmp_path / "data", bad_mirror)
    assert_nothing_left(tmp_path / "data")


def test_corrupt_file_is_named(bad_mirror, tmp_path):
    (bad_mirror / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: not a complete gzip file \(Not a gzipped file"):
        fetch("mnist", tmp_path / "data", bad_mirror)
    assert_nothing_left(tmp_path / "data")


def test_wrong_content_is_named(bad_mirror, tmp_path):
    path = bad_mirror / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(path.read_bytes()))
    content[100] ^= 1
    path.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(
        DataError,
        match=r"t10k-labels-idx1-ubyte.gz: MD5 of the uncompressed content is [0-9a-f]{32}, expected 27ae3e4e",
    ):
        fetch("mnist", tmp_path / "data", bad_mirror)
    assert_nothing_left(tmp_path / "data")


def test_missing_mirror_folder(tmp_path):
    with pytest.raises(DataError, match="DDPM_DATA_MIRROR is not a folder"):
        fetch("mnist", tmp_path / "data", tmp_path / "nowhere")
    assert_nothing_left(tmp_path / "data")


def test_loading_before_fetching_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="run the fetch_data stage first"):
        load_images(tmp_path, "mnist")

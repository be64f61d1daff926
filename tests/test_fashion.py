"""Fashion-MNIST (`data.dataset: fashion-mnist`): its sources and checksums, its class
names in prompts, `ddpm generate` and figures, and one tiny `dvc exp run` end to end.

The data comes from Debian's dataset-fashion-mnist (`apt-get install dataset-fashion-mnist`,
as .ci/run does); without it the tests that need the files skip, saying so.
"""

import csv
import dataclasses
import gzip
import hashlib
import json
import shutil

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import MIRROR, ROOT, run, tiny_raw
from ddpm_core import data
from ddpm_core.cli import main as ddpm_main
from ddpm_core.config import parse_params
from ddpm_core.data import DATASETS, FASHION_MNIST_MD5, fetch, load_images, raw_folder
from ddpm_core.errors import ConfigError, DataError
from ddpm_core.prompts import CLASS_NAMES
from ddpm_core.tracking import EXPERIMENT

DEBIAN = DATASETS["fashion-mnist"].system_folder
needs_debian = pytest.mark.skipif(
    not DEBIAN.is_dir(), reason=f"no Fashion-MNIST at {DEBIAN} (apt-get install dataset-fashion-mnist)"
)
needs_mirror = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"no MNIST mirror at {MIRROR}")
NAMES = list(CLASS_NAMES["fashion-mnist"])


@pytest.fixture(scope="session")
def fashion_root(tmp_path_factory):
    """Fashion-MNIST fetched once per session, from the Debian folder."""
    if not DEBIAN.is_dir():
        pytest.skip(f"no Fashion-MNIST at {DEBIAN} (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("fashion")
    assert fetch("fashion-mnist", root) == (raw_folder(root, "fashion-mnist"), str(DEBIAN))
    return root


@pytest.fixture
def no_download(monkeypatch):
    """torchvision's download, failing as it does without internet."""

    def offline(self, *args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    for key, spec in DATASETS.items():
        # A subclass of the same name: the folder under the root stays torchvision's.
        cls = spec.torchvision_class
        monkeypatch.setitem(
            DATASETS,
            key,
            dataclasses.replace(spec, torchvision_class=type(cls.__name__, (cls,), {"__init__": offline})),
        )


# --- checksums and sources ------------------------------------------------------------


@needs_debian
def test_debian_files_are_the_official_release():
    for name, md5 in FASHION_MNIST_MD5.items():
        assert hashlib.md5(gzip.decompress((DEBIAN / f"{name}.gz").read_bytes())).hexdigest() == md5


def test_fashion_mnist_lands_where_torchvision_reads_it():
    assert raw_folder(ROOT / "data" / "dataset", "fashion-mnist") == ROOT / "data" / "dataset" / "FashionMNIST" / "raw"
    assert list(FASHION_MNIST_MD5) == list(DATASETS["mnist"].md5)  # the same four file names


def test_fashion_mnist_loads_with_its_labels(fashion_root):
    train = load_images(fashion_root, "fashion-mnist", train=True, subset=10)
    assert train.images.shape == (10, 1, 28, 28)
    assert train.labels.tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # ankle boot, t-shirt/top, …
    assert len(load_images(fashion_root, "fashion-mnist", train=False)) == 10_000
    assert not list(fashion_root.glob(".fetch-*"))


@needs_debian
@needs_mirror
def test_a_mirror_of_the_other_dataset_is_skipped_with_one_line(tmp_path, capsys):
    raw, source = fetch("fashion-mnist", tmp_path / "data", MIRROR)
    assert source == str(DEBIAN) and raw == tmp_path / "data" / "FashionMNIST" / "raw"
    assert (
        capsys.readouterr().out
        == f"note: DDPM_DATA_MIRROR {MIRROR} holds MNIST, not Fashion-MNIST; trying the next source\n"
    )


@needs_debian
def test_an_mnist_fetch_skips_a_fashion_mirror_then_reports_the_failed_download(tmp_path, capsys, no_download):
    with pytest.raises(DataError) as info:
        fetch("mnist", tmp_path / "data", DEBIAN)
    assert (
        capsys.readouterr().out
        == f"note: DDPM_DATA_MIRROR {DEBIAN} holds Fashion-MNIST, not MNIST; trying the next source\n"
    )
    assert str(info.value) == (
        "MNIST: the torchvision download failed (Error downloading train-images-idx3-ubyte.gz); "
        "set DDPM_DATA_MIRROR to a folder holding the four .gz files"
    )
    assert not (tmp_path / "data").exists()


def test_without_the_debian_folder_fashion_mnist_is_downloaded(tmp_path, monkeypatch, no_download):
    spec = DATASETS["fashion-mnist"]
    monkeypatch.setitem(DATASETS, "fashion-mnist", dataclasses.replace(spec, system_folder=tmp_path / "absent"))
    with pytest.raises(
        DataError,
        match=rf"^Fashion-MNIST: the torchvision download failed .*or install them into {tmp_path / 'absent'}$",
    ):
        fetch("fashion-mnist", tmp_path / "data")


@pytest.fixture
def fashion_mirror(tmp_path):
    if not DEBIAN.is_dir():
        pytest.skip(f"no Fashion-MNIST at {DEBIAN} (apt-get install dataset-fashion-mnist)")
    return shutil.copytree(DEBIAN, tmp_path / "mirror")


def test_a_corrupted_fashion_file_is_named(fashion_mirror, tmp_path):
    path = fashion_mirror / "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(path.read_bytes()))
    content[100] ^= 1
    path.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(
        DataError, match=rf"^{path}: MD5 of the uncompressed content is [0-9a-f]{{32}}, expected 15d48437"
    ):
        fetch("fashion-mnist", tmp_path / "data", fashion_mirror)
    assert not (tmp_path / "data").exists()


def test_a_first_file_of_neither_dataset_is_an_error_not_a_skip(fashion_mirror, tmp_path):
    path = fashion_mirror / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(b"not images"))
    with pytest.raises(
        DataError, match=rf"^{path}: MD5 of the uncompressed content is [0-9a-f]{{32}}, expected f4a8712d"
    ):
        fetch("fashion-mnist", tmp_path / "data", fashion_mirror)


def test_a_broken_debian_folder_is_an_error_naming_the_file(fashion_mirror, tmp_path, monkeypatch):
    (fashion_mirror / "t10k-images-idx3-ubyte.gz").unlink()
    spec = DATASETS["fashion-mnist"]
    monkeypatch.setitem(DATASETS, "fashion-mnist", dataclasses.replace(spec, system_folder=fashion_mirror))
    with pytest.raises(DataError, match=rf"^{fashion_mirror / 't10k-images-idx3-ubyte.gz'}: file not found$"):
        fetch("fashion-mnist", tmp_path / "data")


def test_loading_the_dataset_that_was_not_fetched_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match=r"FashionMNIST/raw: no Fashion-MNIST here; run the fetch_data stage first"):
        load_images(tmp_path, "fashion-mnist")


# --- ddpm generate ------------------------------------------------------------------


@pytest.fixture
def fashion_project(tmp_path, monkeypatch):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["dataset"] = "fashion-mnist"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_generate_takes_fashion_names_from_params_yaml(fashion_project, capsys):
    with pytest.raises(SystemExit) as info:
        ddpm_main(["generate", "--prompt", "sneaker, sock"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "error: unknown class 'sock'; accepted: 0-9 or t-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot\n"
    )
    # A good prompt gets past the words to the missing model.
    with pytest.raises(SystemExit):
        ddpm_main(["generate", "--prompt", "Ankle Boot, bag"])
    assert "models/cond.pt: not found" in capsys.readouterr().err


def test_generate_help_lists_the_fashion_words(fashion_project, capsys):
    with pytest.raises(SystemExit):
        ddpm_main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "t-shirt/top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag, ankle boot" in help_text
    assert "Fashion-MNIST" in help_text


def test_params_take_fashion_mnist_and_list_the_datasets():
    assert parse_params(tiny_raw(data={"dataset": "fashion-mnist"})).data.dataset == "fashion-mnist"
    with pytest.raises(
        ConfigError, match=r"^params.yaml: data.dataset = 'fashion': Input should be 'mnist' or 'fashion-mnist'$"
    ):
        parse_params(tiny_raw(data={"dataset": "fashion"}))


def test_both_datasets_have_ten_named_classes():
    assert set(CLASS_NAMES) == set(DATASETS)
    assert all(len(names) == data.NUM_CLASSES for names in CLASS_NAMES.values())


# --- end to end -----------------------------------------------------------------------


@pytest.mark.slow
@needs_debian
@needs_mirror
def test_dvc_exp_run_on_fashion_mnist_lands_in_mlflow_as_its_own_run(tiny_pipeline_copy):
    project = tiny_pipeline_copy
    done = run(["dvc", "exp", "run", "-n", "fashion", "-S", "data.dataset=fashion-mnist"], project)
    out = done.stdout + done.stderr
    assert f"note: DDPM_DATA_MIRROR {MIRROR} holds MNIST, not Fashion-MNIST; trying the next source" in out
    assert f"fetch_data: verified Fashion-MNIST in data/dataset/FashionMNIST/raw (from {DEBIAN})" in out
    assert sorted(p.name for p in (project / "data" / "dataset").iterdir()) == ["FashionMNIST"]

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (parent,) = client.search_runs(
        [experiment.experiment_id], "tags.`ddpm.role` = 'pipeline' AND attributes.run_name = 'fashion'"
    )
    assert parent.info.status == "FINISHED"
    assert parent.data.params["data.dataset"] == "fashion-mnist"
    assert {"fid_cond", "fid_uncond", "fid_floor", "cond_accuracy"} <= set(parent.data.metrics)
    stages = {
        r.info.run_name: r
        for r in client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    }
    assert sorted(stages) == sorted(
        ["fetch_data", "train_uncond", "train_cond", "train_evaluator", "sample", "evaluate", "plot"]
    )
    assert all(r.info.status == "FINISHED" for r in stages.values())
    assert stages["fetch_data"].data.tags["data.source"] == str(DEBIAN)
    assert stages["train_cond"].data.params["data.dataset"] == "fashion-mnist"  # what `ddpm generate --run-id` reads

    # The workspace holds the experiment's results, with Fashion-MNIST's class names.
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert parent.data.metrics["fid_cond"] == pytest.approx(metrics["fid_cond"])
    assert 0.5 < json.loads((project / "reports" / "evaluator.json").read_text())["test_accuracy"] <= 1
    rows = list(csv.DictReader((project / "reports" / "per_class.csv").open()))
    assert [r["class"] for r in rows] == NAMES
    report = (project / "reports" / "report.md").read_text()
    assert "| ankle boot |" in report and "evaluator accuracy (Fashion-MNIST test)" in report
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/per_class_accuracy.png", "figures/real_vs_generated.png", "figures/samples.png"} <= figures

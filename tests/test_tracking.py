"""What a stage run records in MLflow beside its metrics: input datasets, system metrics,
logged and registered models. Against a real SQLite store in a temporary folder."""

import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from ddpm_core import tracking
from ddpm_core.config import flatten
from ddpm_core.data import ImageSet, dataset_record, load_images
from ddpm_core.environment import sha256_file


def store(root):
    client = MlflowClient(tracking.tracking_uri(root))
    experiment = client.get_experiment_by_name(tracking.EXPERIMENT)
    return client, experiment.experiment_id


def test_a_dataset_digest_follows_the_content():
    images = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    labels = torch.arange(4)
    same = ImageSet(images.clone(), labels.clone())
    assert ImageSet(images, labels).digest() == same.digest()
    assert ImageSet(images, labels.flip(0)).digest() != same.digest()
    other = images.clone()
    other[3, 0, 27, 27] = 1
    assert ImageSet(other, labels).digest() != same.digest()


def test_datasets_are_inputs_of_the_stage_run_and_of_its_parent(mnist_root, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    train = load_images(mnist_root, "mnist", train=True, subset=500)
    test = load_images(mnist_root, "mnist", train=False)
    with tracking.stage_run(tmp_path, "p1", "p1", "train_uncond", {}, {}) as run:
        run.log_dataset(**dataset_record(mnist_root, "mnist", train, True, 500), context="training")
    with tracking.stage_run(tmp_path, "p1", "p1", "train_cond", {}, {}) as run:
        run.log_dataset(**dataset_record(mnist_root, "mnist", train, True, 500), context="training")  # the same again
    with tracking.stage_run(tmp_path, "p1", "p1", "evaluate", {}, {}) as evaluate:
        evaluate.log_dataset(**dataset_record(mnist_root, "mnist", test, False, None), context="evaluation")
    client, _ = store(tmp_path)

    def inputs(run_id):
        return sorted(
            (d.dataset.name, d.dataset.digest, d.tags[0].value) for d in client.get_run(run_id).inputs.dataset_inputs
        )

    assert inputs(run.run_id) == [("mnist-train[:500]", train.digest(), "training")]
    assert inputs(evaluate.run_id) == [("mnist-test", test.digest(), "evaluation")]
    assert inputs(run.parent_id) == sorted(
        [("mnist-train[:500]", train.digest(), "training"), ("mnist-test", test.digest(), "evaluation")]
    )
    (first,) = client.get_run(run.run_id).inputs.dataset_inputs
    assert '"num_images": 500' in first.dataset.profile and '"split": "train"' in first.dataset.profile


@pytest.mark.parametrize("enabled", [True, False])
def test_system_metrics_are_logged_unless_switched_off(tmp_path, monkeypatch, enabled):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true" if enabled else "false")
    with tracking.stage_run(tmp_path, "p", "p", "sample", {}, {}) as run:
        time.sleep(1.5)
    client, _ = store(tmp_path)
    keys = set(client.get_run(run.run_id).data.metrics)
    system = {k for k in keys if k.startswith("system/")}
    if enabled:
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, keys
        assert len(client.get_metric_history(run.run_id, "system/cpu_utilization_percentage")) >= 2
    else:
        assert system == set()


# --- logged and registered models ---------------------------------------------------------


@pytest.fixture
def weights(tmp_path, tiny_params):
    """Untrained weights of the tiny conditional and unconditional U-Nets, and the params."""
    from ddpm_core.unet import build_unet

    paths = {}
    for kind, classes in (("cond", 10), ("uncond", None)):
        torch.manual_seed(0)
        paths[kind] = tmp_path / f"{kind}.pt"
        torch.save(build_unet(tiny_params.model, classes).state_dict(), paths[kind])
    return paths, flatten(tiny_params)


@pytest.fixture
def guides(tmp_path, tiny_params):
    """Other random weights of the same tiny U-Nets, as autoguidance guides (<kind>_guide.pt).
    Perturbed: an untrained U-Net's zero-initialised last layer would output zeros, as the model does."""
    from ddpm_core.unet import build_unet

    paths = {}
    for kind, classes in (("cond", 10), ("uncond", None)):
        torch.manual_seed(1)
        net = build_unet(tiny_params.model, classes)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.02 * torch.randn_like(p))
        paths[kind] = tmp_path / f"{kind}_guide.pt"
        torch.save(net.state_dict(), paths[kind])
    return paths


def register(root, kind, path, params, tags=None, guide=None):
    with tracking.stage_run(root, "p", "p", f"train_{kind}", params, {}) as run:
        run.check_registry(kind)
        model_id, version = run.log_model(kind, path, params, tags or {"dvc.experiment": "workspace"}, guide=guide)
    return run, model_id, version


def test_trained_weights_become_a_logged_model_and_a_registered_version(tmp_path, weights, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    paths, params = weights
    run, first_id, first = register(
        tmp_path / "store", "cond", paths["cond"], params, {"dvc.experiment": "exp-a", "git.revision": "abc"}
    )
    _, second_id, second = register(tmp_path / "store", "cond", paths["cond"], params)
    assert (first, second) == (1, 2) and first_id != second_id
    client, _ = store(tmp_path / "store")

    model = client.get_logged_model(first_id)
    assert model.status == "READY" and model.source_run_id == run.run_id and model.model_type == tracking.MODEL_TYPE
    assert model.params["model.channels"] == str(params["model.channels"])
    assert [o.model_id for o in client.get_run(run.run_id).outputs.model_outputs] == [first_id]
    assert first_id in [o.model_id for o in client.get_run(run.parent_id).outputs.model_outputs]
    version = client.get_model_version("ddpm-mnist-cond", "1")
    assert version.source == f"models:/{first_id}" and version.tags == {
        "dvc.experiment": "exp-a",
        "git.revision": "abc",
    }
    assert client.get_registered_model("ddpm-mnist-cond").tags[tracking.PROJECT_TAG] == tracking.EXPERIMENT

    # Loaded back through the registry, by version and by alias: the same bytes and params.
    client.set_registered_model_alias("ddpm-mnist-cond", "champion", "2")
    for uri in ("models:/ddpm-mnist-cond/1", "models:/ddpm-mnist-cond@champion", f"models:/{second_id}"):
        local, logged, guide = tracking.checkpoint_from_model(
            tmp_path / "store", uri, "cond", tmp_path / uri.replace("/", "_")
        )
        assert local.read_bytes() == paths["cond"].read_bytes() and logged == model.params
        assert guide is None  # logged without one

    # The evaluate stage finds the model by its weights and links metrics to it.
    with tracking.stage_run(tmp_path / "store", "p", "p", "evaluate", {}, {}) as evaluate:
        assert evaluate.logged_model_of(paths["cond"]) == second_id
        assert evaluate.logged_model_of(paths["uncond"]) is None
        evaluate.log_model_metrics(second_id, {"fid_cond": 2.5})
    assert {m.key: m.value for m in client.get_logged_model(second_id).metrics} == {"fid_cond": 2.5}


def test_the_pyfunc_draws_one_image_per_row_the_same_for_the_same_seed(tmp_path, weights, monkeypatch):
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    paths, params = weights
    register(tmp_path, "cond", paths["cond"], params)
    register(tmp_path, "uncond", paths["uncond"], params)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(tmp_path))
    cond = mlflow.pyfunc.load_model("models:/ddpm-mnist-cond/1")
    images = cond.predict(pd.DataFrame({"label": [3, 1, 4]}), params={"seed": 7, "steps": 3})
    assert images.shape == (3, 28, 28) and images.dtype == np.uint8
    assert np.array_equal(images, cond.predict(pd.DataFrame({"label": [3, 1, 4]}), params={"seed": 7, "steps": 3}))
    assert not np.array_equal(images, cond.predict(pd.DataFrame({"label": [3, 1, 4]}), params={"seed": 8, "steps": 3}))
    with pytest.raises(Exception, match=r"label must be a class 0\.\.9; got \[12\]"):
        cond.predict(pd.DataFrame({"label": [12]}))
    uncond = mlflow.pyfunc.load_model("models:/ddpm-mnist-uncond/1")
    assert uncond.predict(pd.DataFrame({"index": range(5)}), params={"steps": 2}).shape == (5, 28, 28)
    # Logged without a guide: the autoguidance weight changes nothing.
    assert np.array_equal(
        uncond.predict(pd.DataFrame({"index": range(3)}), params={"steps": 2, "autoguidance": 3.0}),
        uncond.predict(pd.DataFrame({"index": range(3)}), params={"steps": 2, "autoguidance": 1.0}),
    )


def test_latest_is_the_highest_registered_version(tmp_path, weights, guides, monkeypatch):
    from ddpm_core.errors import RegistryError

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    paths, params = weights
    register(tmp_path, "cond", paths["cond"], params)
    _, _, second = register(tmp_path, "cond", guides["cond"], params)  # other weights as version 2
    assert second == 2
    for uri in ("models:/ddpm-mnist-cond/latest", "models:/ddpm-mnist-cond/Latest"):
        local, _, _ = tracking.checkpoint_from_model(tmp_path, uri, "cond", tmp_path / uri.replace("/", "_"))
        assert local.read_bytes() == guides["cond"].read_bytes() != paths["cond"].read_bytes()
    with pytest.raises(RegistryError, match="models:/ddpm-mnist-uncond/latest: not found in sqlite:///") as info:
        tracking.checkpoint_from_model(tmp_path, "models:/ddpm-mnist-uncond/latest", "uncond", tmp_path / "dl")
    assert "\n" not in str(info.value)


def test_the_guide_travels_with_the_logged_model_and_the_run(tmp_path, weights, guides, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    paths, params = weights
    with tracking.stage_run(tmp_path, "p", "p", "train_cond", params, params) as run:
        run.log_artifact(paths["cond"], "checkpoint")  # as the training stage does: checkpoint/cond.pt ...
        run.log_artifact(guides["cond"], "checkpoint")  # ... and checkpoint/cond_guide.pt
        model_id, version = run.log_model("cond", paths["cond"], params, {}, guide=guides["cond"])
    client, _ = store(tmp_path)
    model = client.get_logged_model(model_id)
    assert model.tags[tracking.GUIDE_TAG] == sha256_file(guides["cond"])
    assert model.tags[tracking.WEIGHTS_TAG] == sha256_file(paths["cond"])
    for uri in (f"models:/ddpm-mnist-cond/{version}", f"models:/{model_id}"):
        local, logged, guide = tracking.checkpoint_from_model(tmp_path, uri, "cond", tmp_path / uri.replace("/", "_"))
        assert local.read_bytes() == paths["cond"].read_bytes() and logged == model.params
        assert guide is not None and guide.read_bytes() == guides["cond"].read_bytes()
    # From the training run, or its pipeline's parent run.
    for run_id in (run.run_id, run.parent_id):
        local, logged, guide = tracking.checkpoint_from_run(tmp_path, run_id, "cond", tmp_path / run_id)
        assert local.read_bytes() == paths["cond"].read_bytes() and logged == model.params
        assert guide is not None and guide.read_bytes() == guides["cond"].read_bytes()
    # A run that logged no guide (trained before guides were): None.
    with tracking.stage_run(tmp_path, "q", "q", "train_uncond", params, {}) as plain:
        plain.log_artifact(paths["uncond"], "checkpoint")
    local, _, guide = tracking.checkpoint_from_run(tmp_path, plain.run_id, "uncond", tmp_path / "plain")
    assert local.read_bytes() == paths["uncond"].read_bytes() and guide is None


def test_the_pyfunc_samples_with_its_guide_at_the_autoguidance_weight(
    tmp_path, weights, guides, tiny_params, monkeypatch
):
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd

    from ddpm_core import hardware
    from ddpm_core.generation import DEFAULT_SAMPLE, generate, load_unet, sampler_for

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    paths, params = weights
    register(tmp_path, "cond", paths["cond"], params, guide=guides["cond"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(tmp_path))
    pyfunc = mlflow.pyfunc.load_model("models:/ddpm-mnist-cond/latest")

    device = hardware.pick_device()
    model = load_unet(paths["cond"], tiny_params.model, True, device)
    guide = load_unet(guides["cond"], tiny_params.model, True, device)
    labels = [3, 1, 4, 1]

    def expected(guide, weight):
        sampler = sampler_for(tiny_params.diffusion, DEFAULT_SAMPLE, 3)
        images = generate(
            model, sampler, len(labels), torch.Generator().manual_seed(7), torch.tensor(labels),
            DEFAULT_SAMPLE["guidance"], 128, device, hardware.sampling_autocast(device), guide=guide, autoguidance=weight,
        )  # fmt: skip
        return images[:, 0].numpy()

    frame = pd.DataFrame({"label": labels})
    plain = expected(None, 1.0)
    assert np.array_equal(pyfunc.predict(frame, params={"seed": 7, "steps": 3, "autoguidance": 1.0}), plain)
    guided = pyfunc.predict(frame, params={"seed": 7, "steps": 3, "autoguidance": 2.5})
    assert np.array_equal(guided, expected(guide, 2.5)) and not np.array_equal(guided, plain)
    default = DEFAULT_SAMPLE["autoguidance_cond"]
    assert np.array_equal(pyfunc.predict(frame, params={"seed": 7, "steps": 3}), expected(guide, default))
    with pytest.raises(Exception, match="autoguidance must be a finite weight, 0 or more; got -1"):
        pyfunc.predict(frame, params={"autoguidance": -1.0})


def test_the_pyfunc_guides_only_in_the_interval_it_is_given(tmp_path, guides, tiny_params, monkeypatch):
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd

    from ddpm_core import hardware
    from ddpm_core.generation import DEFAULT_SAMPLE, generate, load_unet, sampler_for

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    # Random weights whose output depends on the class (an untrained U-Net's barely does):
    # CFG at 5 then changes the bytes.
    net = load_unet(guides["cond"], tiny_params.model, True, torch.device("cpu"))
    with torch.no_grad():
        net.class_emb.weight.copy_(torch.randn(net.class_emb.weight.shape, generator=torch.Generator().manual_seed(2)))
    path = tmp_path / "labelled.pt"
    torch.save(net.state_dict(), path)
    register(tmp_path, "cond", path, flatten(tiny_params))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(tmp_path))
    pyfunc = mlflow.pyfunc.load_model("models:/ddpm-mnist-cond/latest")

    device = hardware.pick_device()
    model = load_unet(path, tiny_params.model, True, device)
    sampler = sampler_for(tiny_params.diffusion, DEFAULT_SAMPLE, 3)
    first, middle, last = sampler.timesteps.tolist()
    frame = pd.DataFrame({"label": [3, 1, 4, 1]})

    def expected(interval):
        images = generate(
            model, sampler, len(frame), torch.Generator().manual_seed(7), torch.tensor(frame["label"].to_numpy()),
            5.0, 128, device, hardware.sampling_autocast(device), guidance_interval=interval,
        )  # fmt: skip
        return images[:, 0].numpy()

    def drawn(interval):
        return pyfunc.predict(frame, params={"seed": 7, "steps": 3, "guidance": 5.0, "guidance_interval": interval})

    every_step = expected(None)
    early = drawn(f"{middle}:{first}")  # CFG at the first two of the three steps
    assert np.array_equal(early, expected([middle, first])) and not np.array_equal(early, every_step)
    assert np.array_equal(drawn("all"), every_step)
    assert np.array_equal(pyfunc.predict(frame, params={"seed": 7, "steps": 3, "guidance": 5.0}), every_step)
    with pytest.raises(Exception, match=r"guidance_interval must be LO:HI, two timesteps with LO ≤ HI .*got '9:3'"):
        drawn("9:3")
    with pytest.raises(
        Exception, match=f"guidance_interval {last + 1}:{middle - 1} holds none of the sampler's timesteps"
    ):
        drawn(f"{last + 1}:{middle - 1}")


def test_bad_model_uris_and_a_foreign_registered_model_are_one_line_and_leave_nothing(tmp_path, weights, monkeypatch):
    from mlflow.tracking import MlflowClient

    from ddpm_core.errors import RegistryError

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    paths, params = weights
    register(tmp_path, "cond", paths["cond"], params)
    root = tmp_path
    for uri, message in (
        ("models:/ddpm-mnist-cond@nope", "models:/ddpm-mnist-cond@nope: not found in"),
        ("models:/ddpm-mnist-cond/9", "models:/ddpm-mnist-cond/9: not found in"),
        ("models:/ddpm-mnist-uncond/1", "models:/ddpm-mnist-uncond/1: not found in"),
        ("runs:/abc/model", "runs:/abc/model: not a model URI"),
    ):
        with pytest.raises(RegistryError, match=message) as info:
            tracking.checkpoint_from_model(root, uri, "cond", tmp_path / "dl")
        assert "\n" not in str(info.value) and info.value.exit_code == 2
    with pytest.raises(
        RegistryError, match="models:/ddpm-mnist-cond/1: is the conditional model; drop --unconditional"
    ):
        tracking.checkpoint_from_model(root, "models:/ddpm-mnist-cond/1", "uncond", tmp_path / "dl")

    client = MlflowClient(tracking.tracking_uri(root))
    experiment_id = client.get_experiment_by_name(tracking.EXPERIMENT).experiment_id
    other = client.create_logged_model(experiment_id, name="someone-elses", model_type="sklearn")
    client.create_registered_model("other-model")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri(root))  # where the registry looks the model id up
    client.create_model_version("other-model", source=f"models:/{other.model_id}", model_id=other.model_id)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(RegistryError, match="models:/other-model/1: not a ddpm-mnist model"):
        tracking.checkpoint_from_model(root, "models:/other-model/1", "cond", tmp_path / "dl")

    # Someone else's registered model of our name: refused before any work, nothing registered.
    client.create_registered_model("ddpm-mnist-uncond")
    before = len(client.search_logged_models([experiment_id]))
    with pytest.raises(
        RegistryError,
        match="registered model 'ddpm-mnist-uncond' exists in the MLflow store but was not made by this project",
    ):
        register(root, "uncond", paths["uncond"], params)
    assert len(client.search_logged_models([experiment_id])) == before
    assert client.search_model_versions("name = 'ddpm-mnist-uncond'") == []


def test_a_registration_that_fails_halfway_leaves_no_version_and_no_ready_model(tmp_path, weights, monkeypatch):
    from mlflow.entities import LoggedModelStatus

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    paths, params = weights

    def refuse(*args, **kwargs):
        raise RuntimeError("the store refused the version")

    monkeypatch.setattr(tracking.MlflowClient, "create_model_version", refuse)
    with pytest.raises(RuntimeError, match="refused"):
        register(tmp_path, "cond", paths["cond"], params)
    client, experiment_id = store(tmp_path)
    (model,) = client.search_logged_models([experiment_id])
    assert model.status == LoggedModelStatus.FAILED
    assert client.search_registered_models() == []  # the one made for it is gone
    with tracking.stage_run(tmp_path, "p", "p", "evaluate", {}, {}) as evaluate:
        assert evaluate.logged_model_of(paths["cond"]) is None  # nothing to link metrics to


def test_a_stage_shorter_than_the_sampling_interval_still_gets_its_system_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true")
    with tracking.stage_run(tmp_path, "p", "p", "fetch_data", {}, {}) as run:
        pass  # far less than SYSTEM_METRICS_SECONDS
    client, _ = store(tmp_path)
    assert len(client.get_metric_history(run.run_id, "system/cpu_utilization_percentage")) == 1

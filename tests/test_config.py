import pytest
import yaml

from conftest import ROOT, tiny_raw
from ddpm_core.config import flatten, load_params, parse_params
from ddpm_core.errors import ConfigError


def test_params_yaml_of_the_repo_is_valid_and_has_the_public_keys():
    params = load_params(ROOT / "params.yaml")
    flat = flatten(params)
    for key in (
        "seed",
        "epochs",
        "data.train_subset",
        "sample.sampler",
        "sample.steps",
        "sample.guidance",
        "evaluate.num_samples",
    ):
        assert key in flat


def error_of(**override) -> str:
    with pytest.raises(ConfigError) as info:
        parse_params(tiny_raw(**override))
    return str(info.value)


def test_wrong_type_names_key_and_value():
    assert error_of(epochs="ten") == "params.yaml: epochs = 'ten': Input should be a valid integer"


def test_out_of_range_values():
    assert "epochs = 0: Input should be greater than or equal to 1" in error_of(epochs=0)
    assert "sample.steps = -5" in error_of(sample={"steps": -5})
    assert "sample.guidance = -1" in error_of(sample={"guidance": -1.0})
    assert "data.train_subset = 70000" in error_of(data={"train_subset": 70000})


def test_unknown_key_suggests_the_right_one():
    raw = tiny_raw()
    raw["epoch"] = raw.pop("epochs")
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    lines = str(info.value).splitlines()
    assert "params.yaml: unknown key 'epoch' (did you mean 'epochs'?)" in lines[0]
    assert "params.yaml: missing key 'epochs'" in lines


def test_unknown_nested_key():
    raw = tiny_raw()
    raw["sample"]["setps"] = 3
    with pytest.raises(ConfigError, match=r"unknown key 'sample.setps' \(did you mean 'sample.steps'\?\)"):
        parse_params(raw)


def test_unknown_sampler_and_schedule_list_the_choices():
    assert "sample.sampler = 'euler': Input should be 'ddpm', 'ddim' or 'dpmpp2m'" in error_of(
        sample={"sampler": "euler"}
    )
    assert "'linear' or 'cosine'" in error_of(diffusion={"schedule": "sigmoid"})


def test_model_width_constraints():
    assert "attention_heads (3) must divide the last width (32)" in error_of(model={"attention_heads": 3})
    assert "model.channels.1 = 20: Input should be a multiple of 8" in error_of(model={"channels": [16, 20]})
    # at patch_size 2 the U-Net starts at 14 pixels: 14 and 7, no third level
    assert "at patch_size 2 the U-Net starts at 14 pixels" in error_of(model={"patch_size": 2, "channels": [8, 16, 32]})
    assert parse_params(tiny_raw(model={"patch_size": 2, "channels": [16, 32]})).model.patch_size == 2
    assert "model.patch_size = 4: Input should be 1 or 2" in error_of(model={"patch_size": 4})


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(bad)


def test_config_error_exit_code_is_two():
    assert ConfigError.exit_code == 2


def test_guidance_sweep_weights_are_non_negative_and_distinct():
    assert "evaluate.guidance_sweep.1 = -2" in error_of(evaluate={"guidance_sweep": [0, -2]})
    assert "lists a weight twice" in error_of(evaluate={"guidance_sweep": [1, 3, 1]})
    assert "evaluate.sweep_samples = 5" in error_of(evaluate={"sweep_samples": 5})


def test_cas_samples_come_from_the_judged_samples():
    message = error_of(evaluate={"num_samples": 100, "cas_samples": 200})
    assert message == (
        "params.yaml: evaluate: cas_samples (200) must be at most num_samples (100): the CAS classifier "
        "trains on the conditional samples the stage judges; raise num_samples too"
    )
    assert "cas_samples (5) must be 0 (no CAS) or at least 10" in error_of(evaluate={"cas_samples": 5})
    assert "evaluate.cas_epochs = 0" in error_of(evaluate={"cas_epochs": 0})
    parse_params(tiny_raw(evaluate={"cas_samples": 0}))  # no CAS


def test_last_timestep_must_leave_room_for_every_step():
    assert "sample.t_min = -1: Input should be greater than or equal to 0" in error_of(sample={"t_min": -1})
    message = error_of(sample={"steps": 10, "t_min": 991})
    assert message == (
        "params.yaml: sample.t_min (991) must be at most diffusion.timesteps − sample.steps "
        "(1000 − 10 = 990), so that each step visits its own timestep"
    )
    parse_params(tiny_raw(sample={"steps": 10, "t_min": 990}))  # the largest that fits
    parse_params(tiny_raw(sample={"sampler": "ddpm", "t_min": 995}))  # DDPM visits all T: unused
    parse_params(tiny_raw(sample={"t_min": None}))


def test_guidance_interval_is_two_ordered_timesteps_holding_a_step():
    parse_params(tiny_raw(sample={"guidance_interval": None}))
    assert parse_params(tiny_raw(sample={"guidance_interval": [0, 340]})).sample.guidance_interval == [0, 340]
    assert error_of(sample={"guidance_interval": [340, 0]}) == (
        "params.yaml: sample.guidance_interval [340, 0] must be [lo, hi] with lo ≤ hi < diffusion.timesteps (1000)"
    )
    assert "lo ≤ hi < diffusion.timesteps (1000)" in error_of(sample={"guidance_interval": [0, 1000]})
    assert error_of(sample={"guidance_interval": [0]}).startswith("params.yaml: sample.guidance_interval = [0]:")
    assert error_of(sample={"guidance_interval": [-1, 5]}).startswith("params.yaml: sample.guidance_interval.0 = -1:")
    assert error_of(sample={"guidance_interval": 340}).startswith("params.yaml: sample.guidance_interval = 340:")
    # Between two of the 10 steps (999, 889, …, 120, 10): guidance would silently never apply.
    assert error_of(sample={"steps": 10, "t_min": 10, "guidance_interval": [500, 540]}) == (
        "params.yaml: sample.guidance_interval [500, 540] holds none of the 10 steps' timesteps "
        "(999, 889, 779, 669, 559, 450, 340, 230, 120, 10): CFG would never apply; widen it or set it to null"
    )
    parse_params(tiny_raw(sample={"steps": 10, "t_min": 10, "guidance_interval": [450, 450]}))  # one step
    parse_params(tiny_raw(sample={"sampler": "ddpm", "guidance_interval": [500, 500]}))  # DDPM visits every t


def test_autoguidance_and_budget_keys_are_checked_and_named():
    assert error_of(train={"guide_at": 0}).startswith("params.yaml: train.guide_at = 0:")
    assert error_of(train={"guide_at": 1.5}).startswith("params.yaml: train.guide_at = 1.5:")
    assert error_of(train={"cond_share": 1.0}).startswith("params.yaml: train.cond_share = 1.0:")
    assert error_of(sample={"autoguidance_uncond": float("inf")}).startswith(
        "params.yaml: sample.autoguidance_uncond = inf:"
    )
    assert error_of(sample={"autoguidance_cond": float("nan")}).startswith(
        "params.yaml: sample.autoguidance_cond = nan:"
    )
    assert error_of(sample={"autoguidance_cond": -1}).startswith("params.yaml: sample.autoguidance_cond = -1:")
    assert "evaluate.autoguidance_sweep.1 = -2" in error_of(evaluate={"autoguidance_sweep": [1, -2]})
    assert "autoguidance_sweep lists a weight twice" in error_of(evaluate={"autoguidance_sweep": [2, 2]})


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"sample": {"guidance": float("inf")}}, "sample.guidance = inf: Input should be a finite number"),
        ({"train": {"min_snr_gamma": float("nan")}}, "train.min_snr_gamma = nan: Input should be a finite number"),
        ({"train": {"grad_clip": float("inf")}}, "train.grad_clip = inf: Input should be a finite number"),
        ({"evaluator": {"lr": float("-inf")}}, "evaluator.lr = -inf: Input should be a finite number"),
        (
            {"evaluate": {"guidance_sweep": [1.0, float("inf")]}},
            "evaluate.guidance_sweep.1 = inf: Input should be a finite",
        ),
        ({"sample": {"guidance": 1e300}}, "sample.guidance = 1e+300: Input should be less than or equal to 20"),
        ({"train": {"lr": 1e300}}, "train.lr = 1e+300: Input should be less than or equal to 1"),
        ({"sample": {"eta": 5.0}}, "sample.eta = 5.0: Input should be less than or equal to 1"),
        ({"seed": 2**70}, f"seed = {2**70}: Input should be less than or equal to 4294967295"),
        ({"sample": {"batch_size": 10**9}}, "sample.batch_size = 1000000000: Input should be less than or equal to"),
        ({"train": {"batch_size": 10**9}}, "train.batch_size = 1000000000: Input should be less than or equal to"),
        ({"diffusion": {"timesteps": 10**9}}, "diffusion.timesteps = 1000000000: Input should be less than or equal"),
        (
            {"model": {"blocks_per_level": 10**6}},
            "model.blocks_per_level = 1000000: Input should be less than or equal",
        ),
        ({"epochs": True}, "epochs = True: Input should be a valid integer"),
        ({"seed": False}, "seed = False: Input should be a valid integer"),
        ({"sample": {"guidance": True}}, "sample.guidance = True: Input should be a valid number"),
    ],
)
def test_numbers_are_finite_bounded_and_not_booleans(override, expected):
    assert expected in error_of(**override)


def test_step_counts_fit_the_schedule():
    assert "train.preview_steps (5000) must be at most diffusion.timesteps (1000)" in error_of(
        train={"preview_steps": 5000}
    )
    assert "sample.steps (5000) must be at most diffusion.timesteps (1000)" in error_of(sample={"steps": 5000})
    message = error_of(sample={"sampler": "ddpm", "t_min": 1000})
    assert "sample.t_min (1000) must be below diffusion.timesteps (1000)" in message
    parse_params(tiny_raw(sample={"steps": 1000, "t_min": 0}))  # the edge itself is fine

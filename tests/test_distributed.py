"""Training in several processes (torch.distributed, gloo on the CPU): each process's share
of a batch, the gradient it adds up to, the same bytes on a rerun, and the bad inputs.
The pipeline run through `dvc exp run -S train.processes=2` is in test_team.py."""

import os
import pickle

import pytest
import torch
from test_train import Recorder, digest

from conftest import tiny_raw
from ddpm_core.config import parse_params
from ddpm_core.data import load_images
from ddpm_core.distributed import World, check_processes, join, leave, run_local
from ddpm_core.errors import ConfigError
from ddpm_core.train import Objective, Optimization, train_diffusion, train_step
from ddpm_core.unet import build_unet


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_the_rows_of_a_batch_are_shared_out_whole_contiguous_and_even(size):
    for n in range(0, 40):
        shares = [World(rank, size).rows(n) for rank in range(size)]
        taken = [i for share in shares for i in range(n)[share]]
        assert taken == list(range(n))  # every row once, in order: contiguous shares
        lengths = [len(range(n)[share]) for share in shares]
        assert max(lengths) - min(lengths) <= 1


def test_world_comes_from_the_launchers_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert World.from_environment() == World(0, 1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert World.from_environment() == World(3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="RANK=4 is outside WORLD_SIZE=4"):
        World.from_environment()


def test_more_processes_than_cores_or_than_a_batch_is_one_error_naming_the_key(monkeypatch):
    monkeypatch.setenv("DDPM_DEVICE", "cpu")
    cores = len(os.sched_getaffinity(0))
    check_processes(cores)  # as many as cores is fine
    with pytest.raises(ConfigError, match=rf"train.processes = {cores + 1}, but this machine has {cores} CPU cores"):
        check_processes(cores + 1)
    with pytest.raises(ConfigError, match=r"train: train.processes \(65\) must be at most train.batch_size \(64\)"):
        parse_params(tiny_raw(train={"processes": 65}))
    with pytest.raises(ConfigError, match=r"train\.processes = 0"):
        parse_params(tiny_raw(train={"processes": 0}))


def _params(subset: int, processes: int):
    # fp32: under bf16 autocast (a CPU with native bf16) a different split of the batch
    # rounds differently, and two epochs carry that past the comparison's tolerance
    train = {"processes": processes, "precision": "fp32"}
    return parse_params(tiny_raw(epochs=2, data={"train_subset": subset}, train=train))


def _worker(rank: int, size: int, port: int, job: dict) -> None:
    """One training process: join the gloo group, do `job`, and let rank 0 pickle the result."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = World(rank, size, rank)
    cpu = torch.device("cpu")
    join(world, cpu)
    try:
        params = _params(job["subset"], size)
        if job["what"] == "step":
            result = _one_step(params, world)
        else:
            data = load_images(job["mnist"], "mnist", subset=job["subset"])
            tracker = Recorder() if world.is_main else None
            run = train_diffusion(data, params, True, job["resume"], tracker, device=cpu, world=world)
            result = {"losses": run.losses, "curve": run.curve, "digest": digest(run.ema_state_dict)}
            result["weights"] = run.ema_state_dict
            result["points"] = tracker.points() if tracker else None
        if world.is_main:
            with open(job["out"], "wb") as f:
                pickle.dump(result, f)
    finally:
        leave()


def _one_step(params, world: World) -> dict:
    """One optimisation step on a fixed batch of 10 (uneven shares at 3 processes)."""
    torch.manual_seed(0)
    model = build_unet(params.model, 10)
    opt = Optimization.build(model, params.train, 10, "fp32", torch.device("cpu"))
    from ddpm_core.distributed import wrap

    opt.net = wrap(model, world, torch.device("cpu"))
    batch = torch.Generator().manual_seed(1)
    x0 = torch.rand((10, 1, 28, 28), generator=batch) * 2 - 1
    labels = torch.randint(0, 10, (10,), generator=batch)
    rows = world.rows(10)
    generator = torch.Generator().manual_seed(2)
    stats = train_step(
        opt, opt_schedule(params), x0[rows], labels[rows], generator, lambda: torch.autocast("cpu", enabled=False),
        Objective.of(params), 10 if world.size > 1 else None, rows, len(range(10)[rows]) * world.size / 10,
    )  # fmt: skip
    return {"weights": {k: v.clone() for k, v in model.state_dict().items()}, "grad_norm": float(stats.grad_norm)}


def opt_schedule(params):
    from ddpm_core.schedule import make_schedule

    return make_schedule(params.diffusion.schedule, params.diffusion.timesteps)


def _run(size: int, job: dict, tmp_path, name: str) -> dict:
    job = {**job, "out": tmp_path / f"{name}.pkl"}
    run_local(_worker, size, job)
    with open(job["out"], "rb") as f:
        return pickle.load(f)


@pytest.mark.parametrize("size", [3])
def test_a_step_in_several_processes_is_the_step_of_the_whole_batch(tmp_path, size):
    """DDP averages the processes' gradients; each scales its loss by its share of the batch,
    so the update is the single-process update of all 10 images, up to the order of sums
    (at 3 processes the shares are 4, 3 and 3 images)."""
    one = _run(1, {"what": "step", "subset": 128}, tmp_path, "one")
    many = _run(size, {"what": "step", "subset": 128}, tmp_path, "many")
    assert many["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-5)
    for key, value in one["weights"].items():
        torch.testing.assert_close(many["weights"][key], value, rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.slow
def test_two_processes_train_the_same_bytes_twice_and_close_to_one_process(mnist_root, tmp_path):
    # 129 images at batch 64: the last batch is one image, so one process trains on none of it.
    job = {"what": "train", "subset": 129, "mnist": mnist_root}
    first = _run(2, {**job, "resume": tmp_path / "a.pt"}, tmp_path, "a")
    second = _run(2, {**job, "resume": tmp_path / "b.pt"}, tmp_path, "b")
    single = _run(1, {**job, "resume": tmp_path / "c.pt"}, tmp_path, "c")
    assert first["digest"] == second["digest"] and first["losses"] == second["losses"]
    assert (tmp_path / "a.pt").exists()  # rank 0 checkpointed the epoch
    # The curve has the same points as one process's, and means over all the processes' rows.
    assert [row["step"] for row in first["curve"]] == [row["step"] for row in single["curve"]]
    assert [step for step, _ in first["points"]] == [int(row["step"]) for row in single["curve"]]
    assert first["losses"] == pytest.approx(single["losses"], rel=1e-3)
    for key, value in single["weights"].items():
        torch.testing.assert_close(first["weights"][key], value, rtol=1e-3, atol=1e-4, msg=key)

"""What every stage shares, and the only code that reads DVC's environment.

- the repo root (DVC_ROOT under `dvc exp run --temp` and queued experiments, which run
  in a temporary copy; the MLflow store and resume checkpoints live at the real root),
- params.yaml, validated, and the keys this stage reads (taken from dvc.yaml, so the
  list lives in one place),
- the identity of this pipeline execution, which names its MLflow parent run,
- turning a user error into one line on stderr and an exit status.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import psutil
import yaml

HERE = Path(__file__).resolve().parent
# Import the ddpm_core of this checkout, not whichever one pip installed: a queued or
# --temp experiment must run the library as it was when the experiment was made.
sys.path.insert(0, str(HERE.parent))

import previous_outputs  # noqa: E402  (stages/, beside this file)

from ddpm_core import environment, envvars, hardware, tracking  # noqa: E402
from ddpm_core.config import Params, flatten, load_params  # noqa: E402
from ddpm_core.errors import exit_on_error  # noqa: E402

# fetch_data's output (dvc.yaml): the chosen dataset in torchvision's layout.
DATA = Path("data/dataset")


def repo_root() -> Path:
    """The real repository root: DVC_ROOT when DVC runs us, else this checkout."""
    return Path(os.environ.get("DVC_ROOT") or HERE.parent).resolve()


def resume_dir() -> Path:
    """Per-epoch training state. Outside DVC's outputs, since DVC deletes those before a
    stage reruns, and at the real root, since a --temp copy is deleted afterwards."""
    return repo_root() / ".ddpm" / "resume"


def data_mirror() -> Path | None:
    """DDPM_DATA_MIRROR as a path; a relative one is taken from where the user typed it,
    which under a --temp experiment is the real root, not the temporary copy."""
    value = os.environ.get("DDPM_DATA_MIRROR")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_absolute() and not path.exists():
        path = repo_root() / path
    return path


def run_environment() -> dict[str, str]:
    """Versions, device, threads, git revision and the hashes of params.yaml and dvc.lock
    (as they are when the stage starts: DVC updates dvc.lock after each stage)."""
    return environment.describe(Path.cwd())


def stage_keys(stage: str, params: Params) -> dict:
    """The params listed for `stage` in dvc.yaml, flattened: what the stage reads."""
    dvc_yaml = yaml.safe_load((HERE.parent / "dvc.yaml").read_text())
    listed = dvc_yaml["stages"][stage].get("params", [])
    flat = flatten(params)
    return {k: v for k, v in flat.items() if any(k == p or k.startswith(p + ".") for p in listed)}


def _dvc_process() -> psutil.Process | None:
    """The `dvc` process that launched this stage, if any."""
    for proc in psutil.Process().parents():
        try:
            argv = proc.cmdline()
        except psutil.Error:
            continue
        if any(Path(a).name == "dvc" for a in argv[:2]) or argv[1:3] == ["-m", "dvc"]:
            return proc
    return None


def pipeline_identity() -> tuple[str, str]:
    """(id, name) of this pipeline execution; every stage of one `dvc repro` or
    `dvc exp run` shares them. DDPM_PIPELINE_ID overrides, for scripts that call stages."""
    exp_name = os.environ.get("DVC_EXP_NAME")
    dvc = _dvc_process()
    started = datetime.fromtimestamp(dvc.create_time() if dvc else psutil.Process().create_time())
    anchor = f"{dvc.pid if dvc else os.getpid()}@{started.isoformat()}"
    pipeline_id = os.environ.get("DDPM_PIPELINE_ID") or f"{exp_name or 'repro'}/{anchor}"
    name = exp_name or f"repro {started:%Y-%m-%d %H:%M:%S}"
    return pipeline_id, name


# Options of `dvc repro` / `dvc exp run` that take a value: the word after them is no target.
_VALUE_OPTIONS = {"-S", "--set-param", "-n", "--name", "-m", "--message", "-j", "--jobs", "-C", "--copy-paths"}


def _dvc_targets() -> tuple[list[str], bool] | None:
    """The stages named on the `dvc repro` / `dvc exp run` command line, and whether it
    asked for them alone (-s); None when DVC did not start this stage."""
    dvc = _dvc_process()
    if dvc is None:
        return None
    try:
        argv = dvc.cmdline()
    except psutil.Error:
        return [], False
    words = (
        argv[argv.index("repro") + 1 :] if "repro" in argv else argv[argv.index("run") + 1 :] if "run" in argv else []
    )
    targets, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in _VALUE_OPTIONS:
            skip = True
        elif not word.startswith("-"):
            targets.append(word.split(":")[-1])
    return targets, "-s" in words or "--single-item" in words


def _upstream(stage: str, stages: dict) -> set[str]:
    """`stage` and every stage whose outputs it depends on, directly or not (dvc.yaml)."""

    def outs(name: str) -> list[str]:
        entries = stages[name].get("outs", []) + stages[name].get("metrics", [])
        return [next(iter(e)) if isinstance(e, dict) else e for e in entries]

    found, todo = set(), [stage]
    while todo:
        name = todo.pop()
        if name in found or name not in stages:
            continue
        found.add(name)
        deps = [str(d) for d in stages[name].get("deps", [])]
        todo += [other for other in stages if any(d == o or d.startswith(o + "/") for o in outs(other) for d in deps)]
    return found


def _lock_is_current(stage: str, params: Params) -> bool:
    """Whether dvc.lock's record of `stage` matches the params and code files it reads now,
    so that DVC would skip it."""
    lock_path = Path("dvc.lock")
    if not lock_path.is_file():
        return False
    entry = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {}).get(stage)
    if not entry:
        return False
    if flatten(entry.get("params", {}).get("params.yaml", {})) != stage_keys(stage, params):
        return False
    for dep in entry.get("deps", []):
        path = Path(dep["path"])
        if str(dep.get("md5", "")).endswith(".dir"):
            continue  # a folder (the dataset): another stage's output, checked by its own stage
        if not path.is_file() or hashlib.md5(path.read_bytes()).hexdigest() != dep.get("md5"):
            return False
    return True


def runs_in_this_execution(stage: str, other: str, params: Params) -> bool:
    """Whether DVC runs stage `other` in the same execution as this `stage` (for the
    run-wide progress line; a best guess, never a decision). A stage listed before this
    one in dvc.yaml ran if it wrote its outputs since DVC started; one listed after will
    run unless dvc.lock says it is up to date or the command line named stages that do
    not need it."""
    targets = _dvc_targets()
    if targets is None:
        return False
    stages = yaml.safe_load((HERE.parent / "dvc.yaml").read_text())["stages"]
    order = list(stages)
    if order.index(other) < order.index(stage):
        dvc = _dvc_process()
        outs = [Path(o if isinstance(o, str) else next(iter(o))) for o in stages[other].get("outs", [])]
        return dvc is not None and all(o.exists() and o.stat().st_mtime >= dvc.create_time() for o in outs)
    named, single = targets
    if single and other not in named:
        return False
    if named and not any(other in _upstream(t, stages) for t in named):
        return False
    return not _lock_is_current(other, params)


def model_version_tags(params: Params) -> dict[str, str]:
    """Tags of a registered model version: the DVC experiment that made it ("workspace" for
    a plain `dvc repro`), the git revision, this pipeline execution and the dataset."""
    pipeline_id, _ = pipeline_identity()
    return {
        "dvc.experiment": os.environ.get("DVC_EXP_NAME") or "workspace",
        "git.revision": environment.git_revision(Path.cwd()),
        "ddpm.pipeline_id": pipeline_id,
        "data.dataset": params.data.dataset,
    }


@contextlib.contextmanager
def stage_run(stage: str, params: Params) -> Iterator[tracking.StageRun]:
    """The MLflow child run of this stage, under this execution's parent run."""
    pipeline_id, name = pipeline_identity()
    env = run_environment()
    with tracking.stage_run(
        repo_root(), pipeline_id, name, stage, flatten(params), stage_keys(stage, params), env
    ) as run:
        yield run


def put_back_outputs() -> list[str]:
    """After this stage failed under `dvc repro` / `dvc exp run`: its outputs as dvc.lock
    records them, from DVC's cache (DVC removed them before running the stage; see
    previous_outputs). Not in a worker of a multi-process training (its launcher does it),
    nor when the stage was started by hand (nothing was removed then: each output is
    written atomically, so it keeps its bytes until the stage replaces it)."""
    if _dvc_process() is None or "LOCAL_RANK" in os.environ:
        return []
    stage = previous_outputs.stage_of_command(sys.argv, HERE.parent / "dvc.yaml")
    if stage is None:
        return []
    try:
        return previous_outputs.restore(Path.cwd(), stage)
    except Exception:  # a full disk, say: the stage's own error is the one to report
        return []


def main(stage_main: Callable[[Params], None]) -> None:
    """Load params and run the stage; a user error, a file error or Ctrl-C/SIGTERM becomes
    one line and an exit status (ddpm_core.errors.exit_on_error), the stage's MLflow run
    is marked FAILED or KILLED, and under DVC its previous outputs are put back."""

    def body() -> None:
        try:
            envvars.check_environment()
            params = load_params("params.yaml")
            hardware.configure_threads()
            stage_main(params)
        except BaseException:
            put_back_outputs()
            raise

    exit_on_error(body)

"""The commands of README.md and docs/*.md cannot drift from the code.

Every command in a fenced `bash` block is of a kind listed here: the cheap ones are run
in a copy of the tiny pipeline, exactly as written (placeholders filled in); the others
(a full training, a server, an install) are checked without running them: their
`-S key=value` overrides must be valid params, their `make` targets must exist. A new
kind of command in the docs fails until it is listed here.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import ROOT, clean_env, merged
from ddpm_core.config import parse_params
from ddpm_core.tracking import EXPERIMENT, ROLE_TAG

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Run in a copy of the tiny pipeline (seconds each).
RUN = ("ddpm generate", "dvc exp show", "dvc metrics show", "dvc plots show", "dvc dag")
# Checked, not run: minutes to hours, a server, or a change to the machine.
CHECKED = (
    "make run", "make test", "make bundle", "make verify", "make bench", "make lint", "make format",
    "dvc repro", "dvc exp run", "dvc queue start", "mlflow ui", "pytest", "source .venv/bin/activate",
    "sudo apt-get install", "pip install", "pre-commit install",
    # A team server, a DVC remote and experiments shared through git (docs/cluster.md): the
    # same commands run in tests/test_team.py against a real PostgreSQL and local remotes.
    "python tools/team_server.py", "export MLFLOW_TRACKING_URI=", "mlflow server", "dvc remote add", "dvc push",
    "dvc pull", "dvc exp push", "dvc exp pull", "git add", "git clone",
    # Keeping a finished run (tests/test_keep_run.py runs it on the tiny pipeline).
    "python tools/keep_run.py",
)  # fmt: skip
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*\s+")


def shell_commands() -> list[tuple[str, str]]:
    """(page, command) for every line of every fenced bash/sh block: comments dropped,
    backslash continuations joined."""
    found = []
    for page in PAGES:
        language = None
        pending = ""
        for line in page.read_text().splitlines():
            if line.startswith("```"):
                language = None if language is not None else (line[3:].strip() or "text")
                continue
            if language not in ("bash", "sh", "shell"):
                continue
            code = re.split(r"\s+#", line, maxsplit=1)[0].strip()
            if code.endswith("\\"):
                pending += code[:-1] + " "
                continue
            code = (pending + code).strip()
            pending = ""
            if code and not code.startswith("#"):
                found.append((page.relative_to(ROOT).as_posix(), code))
    return found


def without_env(command: str) -> str:
    while ENV_ASSIGNMENT.match(command):
        command = ENV_ASSIGNMENT.sub("", command, count=1)
    return command


COMMANDS = shell_commands()


def test_the_docs_show_commands_of_every_kind():
    kinds = {without_env(c).split()[0] for _, c in COMMANDS}
    assert {"make", "dvc", "ddpm", "mlflow"} <= kinds, kinds
    assert any(page == "README.md" for page, _ in COMMANDS)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_lead_to_files(page):
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text())
    missing = [t for t in targets if not t.startswith(("http://", "https://")) and not (page.parent / t).exists()]
    assert not missing, f"{page.name}: links to missing files {missing}"


@pytest.mark.parametrize(("page", "command"), COMMANDS)
def test_each_documented_command_is_of_a_known_kind(page, command):
    bare = without_env(command)
    assert bare.startswith(RUN + CHECKED), f"{page}: `{command}` is neither run nor checked by tests/test_docs.py"


def overrides(command: str) -> list[str]:
    words = shlex.split(without_env(command))
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word in ("-S", "--set-param")]


@pytest.mark.parametrize(("page", "command"), [pc for pc in COMMANDS if overrides(pc[1])])
def test_documented_param_overrides_are_valid_params(page, command):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for override in overrides(command):
        key, value = override.split("=", 1)
        *parents, last = key.split(".")
        section = raw
        for part in parents:
            assert part in section, f"{page}: `{command}`: no section {part!r} in params.yaml"
            section = section[part]
        assert last in section, f"{page}: `{command}`: no key {key!r} in params.yaml"
        change: dict = {last: yaml.safe_load(value)}
        for part in reversed(parents):
            change = {part: change}
        raw = merged(raw, change)
    parse_params(raw)  # raises ConfigError naming the key


@pytest.mark.parametrize(("page", "command"), [pc for pc in COMMANDS if without_env(pc[1]).startswith("make ")])
def test_documented_make_targets_exist(page, command):
    target = shlex.split(without_env(command))[1]
    assert re.search(rf"^{re.escape(target)}:", (ROOT / "Makefile").read_text(), re.M), (
        f"{page}: no make target {target!r}"
    )


def fill_placeholders(command: str, project: Path) -> str:
    """The docs' <placeholders>, filled in from the tiny pipeline's MLflow store."""
    if "<MLflow run id>" in command:
        client = MlflowClient(f"sqlite:///{project}/mlflow.db")
        experiment = client.get_experiment_by_name(EXPERIMENT)
        (parent,) = client.search_runs([experiment.experiment_id], f"tags.`{ROLE_TAG}` = 'pipeline'")
        command = command.replace("<MLflow run id>", parent.info.run_id)
    assert "<" not in command, f"unfilled placeholder in `{command}`"
    return command


@pytest.mark.slow
def test_the_cheap_documented_commands_run(tiny_pipeline_copy):
    """Each `ddpm generate` and `dvc … show` of the docs, once, in a copy of the tiny
    pipeline (its registered model is version 1, as in the docs' examples)."""
    project = tiny_pipeline_copy
    to_run = sorted({without_env(c) for _, c in COMMANDS if without_env(c).startswith(RUN)})
    generate = [c for c in to_run if c.startswith("ddpm ")]
    assert generate

    def run(command: str) -> tuple[str, subprocess.CompletedProcess]:
        words = shlex.split(fill_placeholders(command, project))
        # `ddpm` and `dvc` as this interpreter's modules: the installed entry points.
        argv = [sys.executable, "-m", "ddpm_core" if words[0] == "ddpm" else words[0], *words[1:]]
        return command, subprocess.run(argv, cwd=project, env=clean_env(), capture_output=True, text=True, timeout=300)

    # `ddpm` calls two at a time (each spends seconds importing); DVC's one after another,
    # as they share the repository's lock.
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(run, generate))
    done += [run(c) for c in to_run if c not in generate]
    for command, proc in done:
        assert proc.returncode == 0, f"`{command}` failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        for word in shlex.split(command):
            if word.endswith((".png", ".gif")):
                assert (project / word).stat().st_size > 0, f"`{command}` wrote no {word}"

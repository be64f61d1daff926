"""tools/submission.py: pack a bundle, verify it by a rerun, refuse what would make it lie.

The slow tests share one tiny pipeline (one `dvc repro`) and rerun it once (verify)."""

import importlib.util
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, clean_env
from ddpm_core.config import flatten
from ddpm_core.environment import sha256_file

spec = importlib.util.spec_from_file_location("submission", ROOT / "tools" / "submission.py")
submission = importlib.util.module_from_spec(spec)
spec.loader.exec_module(submission)


def run(cmd, cwd, env_extra=None):
    """`python <cmd>` as a user would type it: no MLflow/DVC variables of ours, the MNIST
    mirror, the venv first on PATH. Returns the process; the caller checks the exit status."""
    return subprocess.run(
        [sys.executable, *cmd], cwd=cwd, env=clean_env() | (env_extra or {}), capture_output=True, text=True
    )


def ok(proc):
    assert proc.returncode == 0, f"{proc.args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def table(stdout: str) -> dict[str, tuple[str, str, str]]:
    """The rows of verify's table: item -> (bundle, rerun, result)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.split(" | ")]
        if len(cells) == 4 and cells[0] != "item":
            rows[cells[0]] = tuple(cells[1:])
    return rows


@pytest.fixture
def reproduced(tiny_pipeline) -> Path:
    """The session's tiny pipeline after `dvc repro` (conftest.py); pack only reads it."""
    return tiny_pipeline


# ---------------------------------------------------------------- end to end (slow)


@pytest.mark.slow
def test_pack_then_verify_passes(reproduced, tmp_path):
    bundle = tmp_path / "out" / "bundle.tar.gz"
    packed = ok(run(["tools/submission.py", "pack", "--out", str(bundle)], reproduced))
    assert str(bundle) in packed.stdout
    assert sorted(os.listdir(bundle.parent)) == ["bundle.tar.gz"]  # no temporary file left

    # What the bundle holds: the code, the work tree's params, the checkpoints' hashes.
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        (top,) = {n.split("/")[0] for n in names}

        def read(name):
            return tar.extractfile(f"{top}/{name}").read()

        checksums = json.loads(read("checksums.json"))
        manifest = json.loads(read("manifest.json"))
        environment = json.loads(read("environment.json"))
        assert read("code/params.yaml") == (reproduced / "params.yaml").read_bytes()
        assert read("code/dvc.lock") == (reproduced / "dvc.lock").read_bytes()
        assert read("reports/metrics.json") == (reproduced / "reports" / "metrics.json").read_bytes()
        assert read("code/stages/plot.py") == (reproduced / "stages" / "plot.py").read_bytes()
        files = {m.name[len(top) + 1 :] for m in tar.getmembers() if m.isfile()}
    assert set(manifest) == files - {"manifest.json"}
    assert {"checksums.json", "environment.json", "reports/report.md", "reports/figures/samples.png"} <= set(manifest)
    assert not any(n.startswith(("code/models/", "code/data/dataset")) for n in files)
    assert checksums == {
        f"models/{m}.pt": sha256_file(reproduced / "models" / f"{m}.pt")
        for m in ("cond", "cond_guide", "evaluator", "evaluator_alt", "uncond", "uncond_guide")
    }
    assert environment["torch"] and environment["params.yaml.sha256"] == sha256_file(reproduced / "params.yaml")

    # The rerun must not log to the caller's MLflow store.
    leak = tmp_path / "caller-mlflow.db"
    keep = tmp_path / "keep"
    verified = run(
        ["tools/submission.py", "verify", str(bundle), "--keep", str(keep)],
        reproduced,
        {"MLFLOW_TRACKING_URI": f"sqlite:///{leak}"},
    )
    ok(verified)
    rows = table(verified.stdout)
    metrics = flatten(json.loads((reproduced / "reports" / "metrics.json").read_text()))
    expected = ["manifest", "dvc repro"] + [f"sha256 {m}" for m in checksums] + [f"metric {k}" for k in metrics]
    for item in expected:
        assert rows[item][2] == "PASS", (item, rows.get(item))
    for name, digest in checksums.items():
        assert rows[f"sha256 {name}"][:2] == (digest[:16], digest[:16])
    assert rows["env torch"][2] in ("same", "differs")
    assert rows["env threads"][2] == "same" and "threads, as the bundle was made with" in verified.stdout
    assert verified.stdout.strip().splitlines()[-2] == f"verify: PASS ({len(expected)} checks)"
    assert "Running stage 'train_uncond'" in verified.stdout  # it really reran, and streamed it
    assert not leak.exists()
    (code,) = keep.glob("*/code")
    assert (code / "mlflow.db").is_file()
    assert sha256_file(code / "models" / "cond.pt") == checksums["models/cond.pt"]


def rewrite_bundle(bundle: Path, out: Path, edit):
    """Copy `bundle` to `out`, passing each member's (name, bytes) through `edit`, which
    returns new bytes or None to drop the file."""
    with tarfile.open(bundle) as src, tarfile.open(out, "w:gz") as dst:
        for member in src.getmembers():
            data = src.extractfile(member).read() if member.isfile() else None
            if data is not None:
                data = edit(member.name.split("/", 1)[1], data)
                if data is None:
                    continue
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data) if data is not None else None)


@pytest.mark.slow
@pytest.mark.parametrize(
    "target, edit, shown",
    [
        ("reports/metrics.json", lambda b: b[:10] + bytes([b[10] ^ 1]) + b[11:], "(changed)"),
        ("code/stages/plot.py", lambda b: None, "missing"),
    ],
    ids=["one-byte-changed", "file-removed"],
)
def test_verify_fails_on_tampered_bundle_without_rerun(reproduced, tmp_path, target, edit, shown):
    bundle = tmp_path / "bundle.tar.gz"
    ok(run(["tools/submission.py", "pack", "--out", str(bundle)], reproduced))
    tampered = tmp_path / "tampered.tar.gz"
    rewrite_bundle(bundle, tampered, lambda name, data: edit(data) if name == target else data)

    proc = run(["tools/submission.py", "verify", str(tampered)], reproduced)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = table(proc.stdout)
    assert rows[f"file {target}"][2] == "FAIL" and shown in rows[f"file {target}"][1]
    assert len(rows) == 1  # every other file matches; nothing else ran
    assert proc.stdout.strip().splitlines()[-1] == "verify: FAIL (1 of 1 checks failed)"
    assert "Running stage" not in proc.stdout and "dvc repro" not in proc.stdout


def pack_refusal(project: Path, tmp_path: Path) -> str:
    """Run pack, expect a refusal: exit 1, nothing written; return its one line."""
    out = tmp_path / "out"
    out.mkdir()
    proc = run(["tools/submission.py", "pack", "--out", str(out / "b.tar.gz")], project)
    assert proc.returncode == 1
    assert os.listdir(out) == []  # nothing written, not even a temporary file
    (line,) = proc.stderr.strip().splitlines()
    return line


@pytest.mark.slow
def test_pack_refuses_when_params_changed_without_repro(tiny_pipeline_copy, tmp_path):
    params = tiny_pipeline_copy / "params.yaml"
    raw = yaml.safe_load(params.read_text())
    raw["sample"]["guidance"] = raw["sample"]["guidance"] + 1.0
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    line = pack_refusal(tiny_pipeline_copy, tmp_path)
    assert line.startswith("error: the pipeline is not up to date") and "run dvc repro first" in line
    assert "sample" in line and "train_uncond" not in line


@pytest.mark.slow
def test_pack_refuses_uncommitted_code(tiny_pipeline_copy, tmp_path):
    plot = tiny_pipeline_copy / "stages" / "plot.py"
    plot.write_bytes(plot.read_bytes() + b"\n# an uncommitted change\n")
    line = pack_refusal(tiny_pipeline_copy, tmp_path)
    assert line.startswith("error: uncommitted changes to stages/plot.py:") and "commit them first" in line


@pytest.mark.slow
def test_pack_takes_a_new_output_not_yet_in_git(tiny_pipeline_copy, tmp_path):
    # As after the first `dvc repro` of a pipeline that gained an output: reports/ is
    # taken from the work tree, so an untracked output is no reason to refuse.
    project = tiny_pipeline_copy
    subprocess.run(["git", "rm", "-q", "--cached", "reports/guidance_sweep.csv"], cwd=project, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "untrack an output"],
        cwd=project,
        check=True,
    )
    bundle = tmp_path / "b.tar.gz"
    ok(run(["tools/submission.py", "pack", "--out", str(bundle)], project))
    with tarfile.open(bundle) as tar:
        assert any(n.endswith("/reports/guidance_sweep.csv") for n in tar.getnames())
    (project / "notes.txt").write_text("not an output")
    assert "untracked files notes.txt" in pack_refusal(project, tmp_path)


# ---------------------------------------------------------------- fast


def test_pack_refuses_outside_a_git_checkout(tmp_path):
    proc = run([str(ROOT / "tools" / "submission.py"), "pack"], tmp_path)
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        == f"error: {tmp_path} is not a git checkout: run this from the root of the ddpm-mnist repository"
    )


def test_verify_refuses_what_is_not_a_bundle(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tar file")
    proc = run([str(ROOT / "tools" / "submission.py"), "verify", str(junk)], tmp_path)
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {junk}: not a readable submission bundle")


def test_help_names_both_commands():
    proc = ok(run([str(ROOT / "tools" / "submission.py"), "--help"], ROOT))
    assert "pack" in proc.stdout and "verify" in proc.stdout
    assert "--rtol" in ok(run([str(ROOT / "tools" / "submission.py"), "verify", "--help"], ROOT)).stdout


def test_compare_metrics_flattens_and_is_exact_by_default():
    bundle = {"fid": 2.75, "n": 1000, "per_class": {"0": 0.5, "1": 1.0}}
    same = submission.compare_metrics(bundle, json.loads(json.dumps(bundle)))
    assert [(r[0], r[3]) for r in same] == [
        ("metric fid", "PASS"),
        ("metric n", "PASS"),
        ("metric per_class.0", "PASS"),
        ("metric per_class.1", "PASS"),
    ]

    nudged = {**bundle, "per_class": {"0": 0.5 * (1 + 1e-12), "1": 1.0}}
    rows = {r[0]: r for r in submission.compare_metrics(bundle, nudged)}
    assert rows["metric per_class.0"][3] == "FAIL" and rows["metric fid"][3] == "PASS"
    assert rows["metric per_class.0"][1] != rows["metric per_class.0"][2]  # full precision shown
    assert all(r[3] == "PASS" for r in submission.compare_metrics(bundle, nudged, rtol=1e-9))
    assert submission.compare_metrics({"a": 1.0}, {"a": 1.1}, rtol=1e-3)[0][3] == "FAIL"


def test_compare_metrics_fails_a_metric_missing_on_either_side():
    rows = {r[0]: r for r in submission.compare_metrics({"a": 1.0, "b": {"c": 2}}, {"a": 1.0, "d": 3})}
    assert rows["metric a"][3] == "PASS"
    assert rows["metric b.c"][1:] == ("2", "missing", "FAIL")
    assert rows["metric d"][1:] == ("missing", "3", "FAIL")


def test_environment_rows_are_notes_not_checks():
    bundle = {"torch": "2.14.1", "device": "cpu", "git_revision": "abc", "dvc.lock.sha256": "0" * 64}
    rows = submission.compare_environment(bundle, {"torch": "2.15.0", "device": "cpu", "git_revision": "def"})
    assert rows == [("env torch", "2.14.1", "2.15.0", "differs"), ("env device", "cpu", "cpu", "same")]
    assert submission.verdict([("metric a", "1", "1", "PASS"), *rows]) == (True, "verify: PASS (1 checks)")
    fail = [("metric a", "1", "2", "FAIL"), ("metric b", "1", "1", "PASS"), *rows]
    assert submission.verdict(fail) == (False, "verify: FAIL (1 of 2 checks failed)")


def test_table_is_aligned_with_a_header():
    rows = [("sha256 models/cond.pt", "ab" * 8, "ab" * 8, "PASS"), ("metric n", "20", "21", "FAIL")]
    lines = submission.format_table(rows).splitlines()
    assert lines[0].split(" | ")[0].strip() == "item" and set(lines[1]) <= {"-", "+"}
    assert len({line.index("|") for line in lines if "|" in line}) == 1
    assert table("\n".join(lines)) == {r[0]: r[1:] for r in rows}


def test_check_manifest_names_changed_missing_and_unlisted_files(tmp_path):
    for name, text in {"a.txt": "a", "sub/b.txt": "b", "c.txt": "c"}.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    manifest = {n: sha256_file(tmp_path / n) for n in ("a.txt", "sub/b.txt", "c.txt")}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert submission.check_manifest(tmp_path) == [("manifest", "3 files", "all match", "PASS")]

    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "c.txt").unlink()
    (tmp_path / "extra.txt").write_text("x")
    rows = {r[0]: r for r in submission.check_manifest(tmp_path)}
    assert set(rows) == {"file a.txt", "file c.txt", "file extra.txt"}
    assert all(r[3] == "FAIL" for r in rows.values())
    assert rows["file a.txt"][2].endswith("(changed)") and rows["file c.txt"][2] == "missing"


def test_is_under_matches_whole_path_components():
    outs = ["reports/figures", "models/cond.pt"]
    assert submission.is_under("reports/figures/loss.png", outs) and submission.is_under("models/cond.pt", outs)
    assert not submission.is_under("reports/figures2/x.png", outs) and not submission.is_under(
        "models/cond.pt.bak", outs
    )

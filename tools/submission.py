#!/usr/bin/env python
"""Pack a submission bundle, or verify one by re-running its pipeline.

    python tools/submission.py pack [--out PATH]
    python tools/submission.py verify BUNDLE [--keep DIR] [--rtol X]

A bundle is one .tar.gz holding, under a single top folder:

    code/              `git archive HEAD`, with the work tree's params.yaml and dvc.lock
    reports/           the work tree's reports/ (metrics.json, figures, report.md, csv/json)
    checksums.json     SHA-256 of each checkpoint (the outs under models/ in dvc.lock)
    environment.json   ddpm_core.environment.describe() of the repo: versions, device, ...
    manifest.json      SHA-256 of every other file of the bundle, so tampering shows

`verify` checks the manifest, extracts the bundle into a fresh directory, runs
`dvc repro --force` there and compares checkpoint hashes and metrics with the bundle.
This script calls dvc and git as subprocesses: ddpm_core knows nothing of DVC.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

# The ddpm_core of this checkout (as stages/common.py does), not whichever pip installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ddpm_core import environment, envvars, hardware
from ddpm_core.config import flatten

# params.yaml and dvc.lock come from the work tree: after `dvc repro` both may differ from HEAD.
WORK_TREE_FILES = ("params.yaml", "dvc.lock")
# Environment keys shown as notes. The git revision and the input hashes are left out: the
# rerun's repository is new, and its dvc.lock is rewritten by the rerun itself.
ENV_SKIPPED = ("git_revision",)
# Per-run identity and another store must not leak into the rerun.
LEAKY_ENV = ("MLFLOW_", "DVC_", "DDPM_PIPELINE_ID", "GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE")


class Refusal(Exception):
    """A one-line reason, printed as `error: ...` with exit status 1."""


# ---------------------------------------------------------------- helpers


def run(cmd: list[str], cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kwargs)


def dvc_cmd(*args: str) -> list[str]:
    """dvc of this interpreter, so the venv's dvc runs even when it is not on PATH."""
    return [sys.executable, "-m", "dvc", *args]


def lock_outs(lock: dict) -> list[str]:
    """Every output path recorded in a dvc.lock (metrics and plots included)."""
    return sorted({out["path"] for stage in lock.get("stages", {}).values() for out in stage.get("outs", [])})


def checkpoint_files(root: Path, lock: dict) -> list[str]:
    """The checkpoints: the outs under models/ in dvc.lock (files, or files of a folder)."""
    files = []
    for out in lock_outs(lock):
        if out.startswith("models/"):
            path = root / out
            files += (
                sorted(str(p.relative_to(root)) for p in path.rglob("*") if p.is_file()) if path.is_dir() else [out]
            )
    return files


def is_under(path: str, prefixes: list[str]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def git_changes(root: Path) -> tuple[list[str], list[str]]:
    """(tracked files that differ from HEAD, untracked files not ignored)."""
    out = run(["git", "status", "--porcelain", "-z", "--untracked-files=normal"], root, check=True).stdout
    entries = out.split("\0")
    modified, untracked = [], []
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if not entry:
            continue
        status, path = entry[:2], entry[3:]
        if status == "??":
            untracked.append(path)
        else:
            modified.append(path)
            if "R" in status or "C" in status:  # a rename is followed by its old path
                modified.append(entries[i])
                i += 1
    return modified, untracked


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def describe(root: Path) -> dict[str, str]:
    envvars.check_environment()
    hardware.configure_threads()  # as every stage does, so `threads` is what the stages used
    return environment.describe(root)


# ---------------------------------------------------------------- pack


def check_packable(root: Path) -> dict:
    """Refuse (Refusal) unless `root` is a git checkout at a commit whose pipeline is up to
    date; return its dvc.lock."""
    if not (root / "dvc.yaml").is_file():
        raise Refusal(f"no dvc.yaml in {root}: run this from the root of the ddpm-mnist checkout")
    if run(["git", "rev-parse", "--verify", "-q", "HEAD"], root).returncode != 0:
        raise Refusal("the repository has no commit yet: commit the code first")
    if not (root / "dvc.lock").is_file():
        raise Refusal("no dvc.lock: the pipeline has not run; run dvc repro first")
    lock = yaml.safe_load((root / "dvc.lock").read_text()) or {}
    outs = lock_outs(lock)
    # Besides params.yaml and dvc.lock: the outputs, and the .gitignore DVC writes beside them.
    allowed = list(WORK_TREE_FILES) + outs + [str(Path(out).parent / ".gitignore") for out in outs]
    modified, untracked = git_changes(root)
    code_changes = [p for p in modified if not is_under(p, allowed)]
    untracked = [p for p in untracked if not is_under(p, allowed)]  # e.g. a new output's first run
    if code_changes:
        raise Refusal(
            f"uncommitted changes to {', '.join(code_changes)}: the bundle holds the code of HEAD (git archive), commit them first"
        )
    if untracked:
        raise Refusal(
            f"untracked files {', '.join(untracked)} would be missing from the bundle (git archive HEAD): commit them or add them to .gitignore first"
        )
    status = run(dvc_cmd("status", "--json"), root)
    if status.returncode != 0:
        last = (status.stderr.strip().splitlines() or ["no message"])[-1]
        raise Refusal(f"dvc status failed: {last}")
    stale = json.loads(status.stdout or "{}")
    if stale:
        raise Refusal(
            f"the pipeline is not up to date (stages {', '.join(stale)} changed since dvc.lock): run dvc repro first"
        )
    return lock


def stage_bundle(root: Path, lock: dict, top: Path) -> tuple[int, int]:
    """Write the bundle's files into the folder `top`; return (checkpoints, files listed)."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", "HEAD"], cwd=root, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(top / "code", filter="data")
    for name in WORK_TREE_FILES:
        shutil.copy2(root / name, top / "code" / name)
    shutil.copytree(root / "reports", top / "reports")
    checkpoints = {name: environment.sha256_file(root / name) for name in checkpoint_files(root, lock)}
    (top / "checksums.json").write_text(json.dumps(checkpoints, indent=2) + "\n")
    (top / "environment.json").write_text(json.dumps(describe(root), indent=2) + "\n")
    manifest = {str(p.relative_to(top)): environment.sha256_file(p) for p in files_under(top)}
    (top / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return len(checkpoints), len(manifest)


def pack(out: Path | None) -> int:
    top_level = run(["git", "rev-parse", "--show-toplevel"], Path.cwd())
    if top_level.returncode != 0:
        raise Refusal(f"{Path.cwd()} is not a git checkout: run this from the root of the ddpm-mnist repository")
    root = Path(top_level.stdout.strip())
    lock = check_packable(root)
    rev = run(["git", "rev-parse", "--short", "HEAD"], root, check=True).stdout.strip()
    name = f"{rev}-{datetime.now():%Y%m%d-%H%M%S}"
    out = Path(out) if out else root / "submissions" / f"{name}.tar.gz"
    out.parent.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="ddpm-pack-") as staging:
        top = Path(staging) / name
        n_checkpoints, n_files = stage_bundle(root, lock, top)
        # Written beside its destination, then renamed: a failure leaves no half archive.
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w:gz") as tar:
                tar.add(top, arcname=name)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a bundle is to be handed on
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    print(
        f"packed {out} ({human_size(out.stat().st_size)}): code at {rev}, {n_checkpoints} checkpoint hashes, {n_files} files in the manifest"
    )
    print(f"check it with: python tools/submission.py verify {out}")
    return 0


# ---------------------------------------------------------------- verify


def short(value: object) -> str:
    """A cell of the table: hashes cut to 16 hex digits, numbers in full (repr)."""
    text = repr(value) if isinstance(value, float) else str(value)
    return text[:16] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else text


def same_number(a: object, b: object, rtol: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b if rtol == 0 else math.isclose(a, b, rel_tol=rtol, abs_tol=0.0)


def compare_metrics(bundle: dict, rerun: dict, rtol: float = 0.0) -> list[tuple[str, str, str, str]]:
    """One row per metric (nested dicts flattened to dotted keys); a metric missing on
    either side fails."""
    flat_bundle, flat_rerun = flatten(bundle), flatten(rerun)
    rows = []
    for key in sorted(set(flat_bundle) | set(flat_rerun), key=lambda k: (k not in flat_bundle, k)):
        a, b = flat_bundle.get(key, "missing"), flat_rerun.get(key, "missing")
        ok = key in flat_bundle and key in flat_rerun and same_number(a, b, rtol)
        rows.append((f"metric {key}", short(a), short(b), "PASS" if ok else "FAIL"))
    return rows


def compare_checksums(expected: dict[str, str], code: Path) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, digest in sorted(expected.items()):
        found = environment.sha256_file(code / name)
        rows.append((f"sha256 {name}", short(digest), short(found), "PASS" if found == digest else "FAIL"))
    return rows


def compare_environment(bundle: dict[str, str], rerun: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """Notes, not checks: a different torch or device explains a FAIL, it is not one."""
    keys = [k for k in bundle if k not in ENV_SKIPPED and not k.endswith(".sha256")]
    return [
        (f"env {k}", bundle[k], rerun.get(k, "missing"), "same" if bundle[k] == rerun.get(k) else "differs")
        for k in keys
    ]


def check_manifest(top: Path) -> list[tuple[str, str, str, str]]:
    """A FAIL row for each file changed, missing or not listed; one PASS row if all match."""
    try:
        manifest = json.loads((top / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        return [("manifest.json", "present", f"unreadable ({type(exc).__name__})", "FAIL")]
    present = {str(p.relative_to(top)) for p in files_under(top)} - {"manifest.json"}
    rows = []
    for name, digest in sorted(manifest.items()):
        found = environment.sha256_file(top / name)
        if found != digest:
            rows.append(
                (
                    f"file {name}",
                    short(digest),
                    "missing" if found == "missing" else f"{short(found)} (changed)",
                    "FAIL",
                )
            )
    rows += [(f"file {name}", "not listed", "present", "FAIL") for name in sorted(present - set(manifest))]
    return rows or [("manifest", f"{len(manifest)} files", "all match", "PASS")]


def format_table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("item", "bundle", "rerun", "result")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(4)]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(rows: list[tuple[str, str, str, str]]) -> tuple[bool, str]:
    checks = [r for r in rows if r[3] in ("PASS", "FAIL")]
    failed = sum(r[3] == "FAIL" for r in checks)
    if failed:
        return False, f"verify: FAIL ({failed} of {len(checks)} checks failed)"
    return True, f"verify: PASS ({len(checks)} checks)"


def report(rows: list[tuple[str, str, str, str]]) -> int:
    ok, last = verdict(rows)
    print(format_table(rows))
    print(last)
    return 0 if ok else 1


def rerun_env() -> dict[str, str]:
    """The caller's environment without another MLflow store or DVC's per-run variables;
    the venv's bin first on PATH, so the stages' `python` is this interpreter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LEAKY_ENV)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    mirror = env.get("DDPM_DATA_MIRROR")
    if mirror and not Path(mirror).expanduser().is_absolute():  # relative to where the user typed it
        env["DDPM_DATA_MIRROR"] = str(Path(mirror).expanduser().resolve())
    return env


def extract(bundle: Path, dest: Path) -> Path:
    """Extract `bundle` into `dest`; return its top folder (the one holding manifest.json)."""
    try:
        with tarfile.open(bundle) as tar:
            tar.extractall(dest, filter="data")
    except (tarfile.TarError, EOFError, zlib.error):
        raise Refusal(
            f"{bundle}: not a readable submission bundle (not a .tar.gz archive, or a truncated one)"
        ) from None
    except OSError as exc:
        raise Refusal(f"{bundle}: not a readable submission bundle ({exc.strerror or exc})") from None
    tops = [p.parent for p in dest.glob("*/manifest.json")]
    if len(tops) != 1:
        raise Refusal(f"{bundle}: not a submission bundle (no single folder with a manifest.json)")
    return tops[0]


def rerun(code: Path, bundle_rev: str, threads: str | None) -> tuple[str, str, str, str]:
    """git init + commit (DVC needs a repository), then `dvc repro --force`, streamed.

    With the bundle's thread count: CPU kernels split their sums by thread, so another
    count gives other rounding and other bytes (1 and 2 threads differ in the 7th digit)."""
    env = rerun_env()
    if threads and threads.isdigit():
        env["DDPM_THREADS"] = threads
        print(f"--- {threads} threads, as the bundle was made with (DDPM_THREADS)", flush=True)
    git = [
        "git",
        "-c",
        "user.name=submission verify",
        "-c",
        "user.email=verify@localhost",
        "-c",
        "commit.gpgsign=false",
    ]
    for cmd in (
        ["init", "-q"],
        ["add", "-A"],
        ["commit", "-q", "--no-verify", "-m", f"submission bundle of {bundle_rev}"],
    ):
        subprocess.run(git + cmd, cwd=code, env=env, check=True, stdout=subprocess.DEVNULL)
    print(f"--- dvc repro --force in {code}", flush=True)
    status = subprocess.run(dvc_cmd("repro", "--force"), cwd=code, env=env).returncode
    print("--- dvc repro done", flush=True)
    return ("dvc repro", "exit 0", f"exit {status}", "PASS" if status == 0 else "FAIL")


def verify(bundle: Path, keep: Path | None, rtol: float) -> int:
    if not bundle.is_file():
        raise Refusal(f"{bundle}: no such file")
    if keep is not None:
        if keep.exists() and any(keep.iterdir()):
            raise Refusal(f"--keep {keep}: the folder is not empty; name a new or empty one")
        keep.mkdir(parents=True, exist_ok=True)
    dest = keep.resolve() if keep is not None else Path(tempfile.mkdtemp(prefix="ddpm-verify-"))
    try:
        top = extract(bundle, dest)
        rows = check_manifest(top)
        if rows[-1][3] != "PASS":
            print(f"{bundle}: the bundle's files do not match its manifest; nothing was rerun")
            return report(rows)
        expected_env = json.loads((top / "environment.json").read_text())
        rows.append(rerun(top / "code", expected_env.get("git_revision", "unknown"), expected_env.get("threads")))
        rows += compare_checksums(json.loads((top / "checksums.json").read_text()), top / "code")
        try:
            rerun_metrics = json.loads((top / "code" / "reports" / "metrics.json").read_text())
        except (OSError, ValueError):
            rerun_metrics = {}
        rows += compare_metrics(json.loads((top / "reports" / "metrics.json").read_text()), rerun_metrics, rtol)
        rerun_env_described = describe(top / "code") | (
            {"threads": expected_env["threads"]} if expected_env.get("threads", "").isdigit() else {}
        )
        rows += compare_environment(expected_env, rerun_env_described)
        print(f"\nbundle {bundle}, code at {expected_env.get('git_revision', 'unknown')}")
        status = report(rows)
        if keep is not None:
            print(f"the rerun is kept in {top}")
        return status
    finally:
        if keep is None:
            shutil.rmtree(dest, ignore_errors=True)


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/submission.py",
        description="Pack the pipeline's code, params, dvc.lock, reports, checkpoint hashes and "
        "environment into one archive, or verify such an archive by re-running its pipeline.",
        epilog="Exit status: 0 on success (verify: every check passed), 1 otherwise.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{pack,verify}")
    p = sub.add_parser(
        "pack",
        help="pack a submission bundle of this checkout",
        description="Pack a submission bundle: code/ (git archive HEAD plus the work tree's params.yaml and "
        "dvc.lock), reports/, checksums.json (SHA-256 of the checkpoints under models/), environment.json and "
        "manifest.json. Run from the repository root after `dvc repro`; refuses when the pipeline is not up "
        "to date or code differs from HEAD.",
    )
    p.add_argument(
        "--out",
        type=Path,
        metavar="PATH",
        help="where to write the .tar.gz (default: submissions/<git-short-rev>-<date>-<time>.tar.gz)",
    )
    v = sub.add_parser(
        "verify",
        help="re-run a bundle's pipeline in a fresh directory and compare",
        description="Check the bundle's manifest, extract it into a fresh temporary directory, run "
        "`dvc repro --force` there (MNIST from DDPM_DATA_MIRROR if set; MLflow logs to the temporary "
        "directory) and compare each checkpoint's SHA-256 and every number of reports/metrics.json with the "
        "bundle. Differences of software versions or device are shown as notes, not failures.",
    )
    v.add_argument("bundle", type=Path, metavar="BUNDLE", help="a .tar.gz written by `pack`")
    v.add_argument("--keep", type=Path, metavar="DIR", help="rerun in DIR (new or empty) and keep it for inspection")
    v.add_argument(
        "--rtol",
        type=float,
        default=0.0,
        metavar="X",
        help="relative tolerance for metrics (default 0: exact; e.g. 1e-4 on a GPU)",
    )
    args = parser.parse_args(argv)
    if args.command == "verify" and not args.rtol >= 0:
        parser.error("--rtol must be >= 0")
    try:
        if args.command == "pack":
            return pack(args.out)
        return verify(args.bundle, args.keep, args.rtol)
    except Refusal as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a missing reports/, a full disk, an unwritable --out
        print(f"error: {exc.filename}: {exc.strerror}" if exc.filename else f"error: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"error: {' '.join(map(str, exc.cmd))} failed with exit status {exc.returncode}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

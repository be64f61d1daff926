"""Putting back a failed stage's previous outputs, from DVC's cache.

`dvc repro` deletes a stage's outputs before it runs the stage's command. When the
command then fails (a mixed-up checkpoint, a full disk, Ctrl-C), the models and samples
of the last good run would be gone from the workspace, though dvc.lock still lists them
and DVC's cache still holds them. `restore` puts every output of the stage back as
dvc.lock records it: cached files and folders from DVC's cache, `cache: false` files
(reports committed to git) from git's HEAD when their bytes are the recorded ones. It
writes nothing unless all of an output's bytes are at hand, and changes nothing that
already matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import yaml

from ddpm_core.files import write_atomic


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stage_of_command(argv: list[str], dvc_yaml: Path) -> str | None:
    """The dvc.yaml stage whose command is `python <argv>` (stages/train.py uncond → train_uncond)."""
    command = " ".join(["python", *argv])
    stages = (yaml.safe_load(dvc_yaml.read_text()) or {}).get("stages", {})
    return next((name for name, stage in stages.items() if str(stage.get("cmd", "")).strip() == command), None)


def _git_bytes(root: Path, path: str) -> bytes | None:
    proc = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=root, capture_output=True)
    return proc.stdout if proc.returncode == 0 else None


def _cache_path(root: Path) -> Callable[[str], Path]:
    """md5 → its file in DVC's local cache (wherever `dvc cache dir` put it)."""
    from dvc.repo import Repo  # type: ignore[import-untyped]  # only on failure: importing DVC takes a second

    with Repo(str(root)) as repo:
        base = Path(repo.cache.local.path)
    return lambda md5: base / md5[:2] / md5[2:]


def _put_file(source: Path | bytes, dest: Path) -> None:
    content = source if isinstance(source, bytes) else source.read_bytes()
    write_atomic(dest, lambda f: f.write(content))


def _restore_dir(dest: Path, manifest: list[dict], cached: Callable[[str], Path]) -> bool:
    entries = [(e["relpath"], cached(e["md5"]), e["md5"]) for e in manifest]
    if not all(source.is_file() for _, source, _ in entries):
        return False  # not all of it in the cache (a fresh clone without `dvc pull`): leave it
    same = all((dest / rel).is_file() and _md5(dest / rel) == md5 for rel, _, md5 in entries)
    if same and sum(1 for p in dest.rglob("*") if p.is_file()) == len(entries):
        return False
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(staging, 0o777 & ~mask)  # mkdtemp makes 0700; give what mkdir would
    try:
        for rel, source, _ in entries:
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            staging.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def restore(root: Path, stage: str) -> list[str]:
    """Put `stage`'s outputs back as dvc.lock records them; returns the paths put back."""
    lock_path = root / "dvc.lock"
    if not lock_path.is_file():
        return []
    entry = (yaml.safe_load(lock_path.read_text()) or {}).get("stages", {}).get(stage) or {}
    outs = [o for o in entry.get("outs", []) if "md5" in o and "path" in o]
    if not outs:
        return []
    cached: Callable[[str], Path] | None = None
    restored = []
    for out in outs:
        dest, md5 = root / out["path"], str(out["md5"])
        if md5.endswith(".dir"):
            cached = cached or _cache_path(root)
            manifest_file = cached(md5)
            if manifest_file.is_file() and _restore_dir(dest, json.loads(manifest_file.read_text()), cached):
                restored.append(out["path"])
            continue
        if dest.is_file() and _md5(dest) == md5:
            continue
        cached = cached or _cache_path(root)
        if cached(md5).is_file():
            _put_file(cached(md5), dest)
            restored.append(out["path"])
            continue
        committed = _git_bytes(root, out["path"])  # a `cache: false` output lives in git
        if committed is not None and hashlib.md5(committed).hexdigest() == md5:
            _put_file(committed, dest)
            restored.append(out["path"])
    return restored

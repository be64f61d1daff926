#!/usr/bin/env python
"""A team's MLflow tracking server on PostgreSQL, started and stopped on this machine.

    python tools/team_server.py start [--dir .team] [--host 127.0.0.1] [--port 5000]
    python tools/team_server.py stop  [--dir .team]

`start` makes a PostgreSQL cluster in DIR/postgres (Debian's `initdb`; as root it runs
as the `postgres` user), starts it on a free loopback port with a database `mlflow`,
then runs `mlflow server --backend-store-uri postgresql://… --artifacts-destination
DIR/artifacts` in the background: runs and their metrics go to PostgreSQL, artifacts
(images, checkpoints, logged models) are uploaded and downloaded through the server.
It prints the line to give the pipeline:

    export MLFLOW_TRACKING_URI=http://127.0.0.1:5000

A second `start` with the same DIR reuses the database. Needs the `team` extra
(`pip install -e '.[team]'`: the PostgreSQL driver psycopg) and PostgreSQL's server
programs (Debian: `apt-get install postgresql`). On a shared host, bind `--host` to an
address your team reaches and put the server behind its authentication (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

STATE = "state.json"


class ServerError(Exception):
    """Something the user must fix; printed as one line."""


def _bindir() -> Path:
    """PostgreSQL's server programs: PG_BINDIR, else the newest of Debian's
    /usr/lib/postgresql/*/bin, else whichever `initdb` is on PATH."""
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"])
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise ServerError(
        "PostgreSQL's initdb and pg_ctl were not found; install them (Debian: apt-get install postgresql)"
    )


def _as_owner() -> list[str]:
    """PostgreSQL refuses to run as root: then its programs run as the `postgres` user."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise ServerError(f"{what} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")


def _start_postgres(folder: Path) -> int:
    bindir = _bindir()
    data = folder / "postgres"
    if os.geteuid() == 0:
        import pwd

        owner = pwd.getpwnam("postgres")
        folder.chmod(0o755)  # the postgres user must reach its data and socket folder
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chown(data, owner.pw_uid, owner.pw_gid)
        _run([*_as_owner(), str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"],
             f"initdb {data}")  # fmt: skip
    port = _free_port("127.0.0.1")
    sockets, log = folder / "socket", folder / "postgres.log"
    sockets.mkdir(exist_ok=True)
    log.touch()
    if os.geteuid() == 0:
        for path in (sockets, log):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    options = f"-p {port} -k {sockets} -c listen_addresses=127.0.0.1"
    try:
        _run([*_as_owner(), str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", "start"],
             f"PostgreSQL in {data}")  # fmt: skip
    except ServerError as exc:
        fatal = [line for line in log.read_text(errors="replace").splitlines() if "FATAL" in line]
        raise ServerError(f"{exc}; {fatal[-1] if fatal else f'see {log}'}") from None
    proc = subprocess.run(
        [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"],
        capture_output=True, text=True,
    )  # fmt: skip
    if proc.returncode != 0 and "already exists" not in proc.stderr:
        raise ServerError(f"createdb mlflow on port {port} failed: {proc.stderr.strip().splitlines()[-1]}")
    return port


def _stop_postgres(folder: Path) -> None:
    data = folder / "postgres"
    if (data / "postmaster.pid").exists():
        subprocess.run([*_as_owner(), str(_bindir() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)  # fmt: skip


def _healthy(uri: str) -> bool:
    try:
        return requests.get(f"{uri}/health", timeout=2).ok
    except requests.RequestException:
        return False


def start(folder: Path, host: str, port: int, timeout: float = 180) -> dict:
    """Start PostgreSQL and the MLflow server over it; returns the state written to DIR/state.json."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / STATE).exists():
        state = json.loads((folder / STATE).read_text())
        if _healthy(state["tracking_uri"]):
            return state
        stop(folder)
    pg_port = _start_postgres(folder)
    uri = f"http://{host}:{port}"
    if _healthy(uri):
        _stop_postgres(folder)
        raise ServerError(f"port {port} on {host} already serves an MLflow server; give another --port")
    log = open(folder / "mlflow.log", "ab")  # noqa: SIM115  (the server keeps it)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server",
         "--backend-store-uri", f"postgresql://postgres@127.0.0.1:{pg_port}/mlflow",
         "--artifacts-destination", (folder / "artifacts").as_uri(),
         "--host", host, "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    state = {"tracking_uri": uri, "postgres_port": pg_port, "mlflow_pid": server.pid, "folder": str(folder)}
    (folder / STATE).write_text(json.dumps(state, indent=1) + "\n")
    deadline = time.monotonic() + timeout
    while not _healthy(uri):
        if server.poll() is not None or time.monotonic() > deadline:
            tail = (folder / "mlflow.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            stop(folder)
            raise ServerError(f"mlflow server on {uri} did not start ({folder / 'mlflow.log'}: {tail[0]})")
        time.sleep(0.5)
    return state


def stop(folder: Path) -> None:
    """Stop the MLflow server and PostgreSQL of DIR; their data stays for the next start."""
    folder = folder.resolve()
    path = folder / STATE
    if path.exists():
        pid = json.loads(path.read_text())["mlflow_pid"]
        try:
            os.killpg(pid, signal.SIGTERM)
            for _ in range(100):
                os.killpg(pid, 0)
                time.sleep(0.1)
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        path.unlink()
    _stop_postgres(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("--dir", type=Path, default=Path(".team"), help="where the database, artifacts and logs live")
    parser.add_argument("--host", default="127.0.0.1", help="interface the MLflow server listens on")
    parser.add_argument("--port", type=int, default=5000, help="port of the MLflow server")
    args = parser.parse_args()
    try:
        if args.action == "start":
            state = start(args.dir, args.host, args.port)
            print(
                f"MLflow server on PostgreSQL (port {state['postgres_port']}), artifacts in {args.dir.resolve() / 'artifacts'}"
            )
            print(f"export MLFLOW_TRACKING_URI={state['tracking_uri']}")
        else:
            stop(args.dir)
            print(f"stopped the servers of {args.dir.resolve()}")
    except ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

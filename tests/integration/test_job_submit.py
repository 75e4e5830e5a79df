"""A real `ray job submit` round trip: a Ray head of its own, a job script, its outputs.

The test starts `ray start --head` in a subprocess (own ports, own short temp dir), submits
``python jobs/prepare.py --config <tiny synth config>`` through ``JobSubmissionClient`` with the
repository as ``working_dir`` (so .rayignore decides what is uploaded), waits for SUCCEEDED and
checks the manifest the job wrote. It is what `ray job submit --working-dir .` does on a cluster,
minus the cluster.

Isolation from the session Ray of tests/conftest.py (which runs inside this pytest process):
the head here is a separate process tree with its own ports and temp dir, RAY_ADDRESS is never
set in this process, and teardown signals only the processes this test started. `ray stop` is
never used: in Ray 2.60 it has no address option and stops every Ray process of the user on the
machine, other test sessions included.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from tiny_run import BALANCED_CLEAN

REPO = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 150
HEAD_START_TIMEOUT_S = 90
MANIFEST_COLUMNS = [
    "utt_id",
    "path",
    "duration_s",
    "sample_rate",
    "label",
    "votes",
    "speaker",
    "session",
    "gender",
    "corpus",
    "split",
]
# Every port a head opens, chosen free up front: the defaults (6379, 8265, 10001, 52365, ...)
# would collide with another Ray started on this machine at the same time.
PORT_FLAGS = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "node-manager-port",
    "object-manager-port",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc and prctl"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the head's process: get SIGTERM if pytest dies (PR_SET_PDEATHSIG), so a killed test
    run never leaves a head behind."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _descendants(root: int) -> list[int]:
    """PIDs of every live descendant of ``root`` (raylet, GCS, workers, job drivers, ...)."""
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LocalHead:
    """A `ray start --head --block` of our own, on free ports, torn down by PID."""

    def __init__(self) -> None:
        # A short root: Ray puts Unix sockets under <temp-dir>/session_<date>_<pid>/sockets/ and
        # a socket path must stay under 107 bytes; pytest's tmp_path is too deep for that.
        self.temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")
        self.ports = {flag: _free_port() for flag in PORT_FLAGS}
        self.address = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.log_path = Path(self.temp_dir) / "head.log"
        self.process: subprocess.Popen | None = None
        self.client = None

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            env.pop(key, None)
        env.update(
            # Token auth: disabled, explicitly, for the head and therefore for the job driver
            # (it inherits the raylet's environment). With RAY_AUTH_MODE set, Ray 2.60 neither
            # reads nor writes ~/.ray/auth_token, so a token file left on the machine by another
            # Ray session cannot switch this head into token mode. The client in this process
            # needs nothing: a head without auth ignores a token if one is sent. This matches
            # tests/conftest.py (RAY_AUTH_MODE=disabled for the session Ray); token mode is what
            # cluster.yaml uses, where the token is distributed by file_mounts.
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            RAY_DEDUP_LOGS="0",
            RAY_DATA_DISABLE_PROGRESS_BARS="1",
            # SIGTERM normally drains the node for up to 30 s first; nothing to drain here.
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            # The job's `python` is this interpreter (the venv's): the entrypoint runs in a shell
            # that inherits the head's PATH.
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        )
        return env

    def start(self) -> None:
        command = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--num-cpus=2",
            "--num-gpus=0",
            f"--object-store-memory={150 * 1024**2}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            *(f"--{flag}={port}" for flag, port in self.ports.items()),
        ]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.temp_dir,
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.client = self._wait_for_job_server()

    def _wait_for_job_server(self):
        from ray.job_submission import JobSubmissionClient

        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited ({self.process.returncode}):\n{self.log()}")
            try:
                client = JobSubmissionClient(self.address)
                client.list_jobs()
                return client
            except Exception as err:  # connection refused until the dashboard is up
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"no job server at {self.address}: {err}\n{self.log()}"
                    ) from err
                time.sleep(0.5)

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-5000:]
        except OSError:
            return "(no head log)"

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops the node's processes), then SIGKILL whatever
        this head started and left alive. Only these PIDs are ever signalled."""
        if self.process is None:
            return
        started = _descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in started:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def ray_head():
    head = LocalHead()
    try:
        head.start()
        yield head
    finally:
        head.stop()


def _submit(client, **kwargs) -> str:
    """submit_job, retried briefly: the dashboard answers a moment before the node's job agent
    is registered, and a submission in that window is refused."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return client.submit_job(**kwargs)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _wait(client, submission_id: str, timeout_s: float):
    from ray.job_submission import JobStatus

    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(submission_id)
    while status not in terminal and time.monotonic() < deadline:
        time.sleep(1)
        status = client.get_job_status(submission_id)
    return status


@pytest.mark.timeout(300)
def test_prepare_job_round_trip(ray_head, tmp_path):
    from ray.job_submission import JobStatus

    config_path = tmp_path / "job-test.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "job-test", "output_dir": str(tmp_path / "runs")},
                "corpus": {
                    "name": "synth",
                    "root": str(tmp_path / "synth"),
                    "synth": {"n_speakers": 3, "utterances_per_emotion": 2, **BALANCED_CLEAN},
                },
            }
        )
    )
    started = time.monotonic()
    submission_id = _submit(
        ray_head.client,
        entrypoint=f"python jobs/prepare.py --config {config_path}",
        # The repository as uploaded by `ray job submit --working-dir .`: .rayignore keeps .venv,
        # runs/, data/ and .git out of it. The job runs from the unpacked copy, so the relative
        # path jobs/prepare.py only resolves if the upload happened.
        runtime_env={"working_dir": str(REPO)},
        submission_id=f"job-test-{os.getpid()}-{int(time.time())}",
    )
    status = _wait(ray_head.client, submission_id, JOB_TIMEOUT_S)
    logs = ray_head.client.get_job_logs(submission_id)
    elapsed = time.monotonic() - started
    print(f"job {submission_id}: {status} after {elapsed:.1f} s")
    assert status == JobStatus.SUCCEEDED, (
        f"job {submission_id} ended {status} after {elapsed:.0f} s\n--- job logs ---\n{logs}"
        f"\n--- head log ---\n{ray_head.log()}"
    )

    # The job ran from an uploaded package, not from this checkout.
    info = ray_head.client.get_job_info(submission_id)
    assert info.runtime_env["working_dir"].startswith("gcs://_ray_pkg_")

    # The prepare stage's own summary reached the job logs.
    assert "manifest: 24 utterances" in logs, logs

    manifest_path = tmp_path / "runs" / "job-test" / "manifest.parquet"
    assert manifest_path.is_file(), logs
    table = pq.read_table(manifest_path)
    assert table.column_names == MANIFEST_COLUMNS
    assert table.num_rows == 24  # 3 speakers x 4 emotions x 2 utterances
    rows = table.to_pylist()
    assert len({r["utt_id"] for r in rows}) == 24
    assert {r["label"] for r in rows} == {"neutral", "happy", "angry", "sad"}
    assert len({r["speaker"] for r in rows}) == 3
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    synth_root = tmp_path / "synth"
    for row in rows:
        assert Path(row["path"]).is_file() and Path(row["path"]).is_relative_to(synth_root)
        assert row["duration_s"] > 0 and row["sample_rate"] > 0

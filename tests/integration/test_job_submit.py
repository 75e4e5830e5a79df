"""Real `ray job submit` round trips: a Ray head of its own, every job script, their outputs.

The module starts one `ray start --head` in a subprocess (own ports, own short temp dir, 2 CPUs)
and submits each ``jobs/*.py`` to it with the repository as ``working_dir`` (so .rayignore
decides what is uploaded), waits for SUCCEEDED and checks the files the job wrote: first
``jobs/prepare.py`` on its own, then, on one tiny run directory, ``tapt.py``, ``run_al.py``,
``finetune.py``, ``sweep.py`` (2 Tune trials) and ``report.py`` (this one through the
`ray job submit` command line itself). It is what `ray job submit --working-dir .` does on a
cluster, minus the cluster.

Isolation from the session Ray of tests/conftest.py (which runs inside this pytest process):
the head here is a separate process tree with its own ports and temp dir, RAY_ADDRESS is never
set in this process, and teardown signals only the processes this test started. `ray stop` is
never used: in Ray 2.60 it has no address option and stops every Ray process of the user on the
machine, other test sessions included.
"""

from __future__ import annotations

import copy
import ctypes
import json
import os
import shlex
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
from tiny_run import BALANCED_CLEAN, TINY

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


@pytest.fixture(scope="module")
def ray_head():
    """One head for the module: the prepare round trip and the stage jobs share it."""
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


# ------------------------------------------------------------------ every other stage's job
# The tiny run of tests/fixtures/tiny_run.py, cheaper (as tests/integration/test_sweep.py's):
# TAPT 4 steps, 1 epoch, random cold start, two rounds (25% then 50% of the 48-item pool).
STAGE_POOL, STAGE_PER_ROUND, STAGE_ROUNDS = 48, 12, 2
SWEEP_STRATEGIES = ("after", "random")
STAGE_JOB_TIMEOUT_S = 240


def _stage_config(tmp_path: Path) -> Path:
    data = copy.deepcopy(TINY)
    data["run"].update(name="jobs", output_dir=str(tmp_path / "runs"))  # absolute, as documented
    data["corpus"]["root"] = str(tmp_path / "synth")
    data["tapt"].update(steps=4, warmup_steps=1)
    data["finetune"]["epochs"] = 1
    data["al"].update(cold_start="random", mc_dropout_samples=0)
    data["al"]["budget"]["max_total"] = 0.5
    data["ray"]["scoring_batch_size"] = 32
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run_job(head: LocalHead, name: str, argv: list[str], timeout_s: float) -> str:
    """Submit ``python jobs/<stage>.py ARGS`` with the repository as working_dir (what
    ``ray job submit --working-dir . -- python jobs/...`` does), wait, check SUCCEEDED from an
    uploaded package; returns the job's logs."""
    from ray.job_submission import JobStatus

    started = time.monotonic()
    submission_id = _submit(
        head.client,
        entrypoint=shlex.join(["python", *argv]),
        runtime_env={"working_dir": str(REPO)},
        submission_id=f"{name}-{os.getpid()}-{int(time.time())}",
    )
    status = _wait(head.client, submission_id, timeout_s)
    logs = head.client.get_job_logs(submission_id)
    elapsed = time.monotonic() - started
    print(f"job {submission_id}: {status} after {elapsed:.1f} s")
    if status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        head.client.stop_job(submission_id)
    assert status == JobStatus.SUCCEEDED, (
        f"job {submission_id} ended {status} after {elapsed:.0f} s\n--- job logs ---\n"
        f"{logs[-8000:]}\n--- head log ---\n{head.log()}"
    )
    info = head.client.get_job_info(submission_id)
    assert info.runtime_env["working_dir"].startswith("gcs://_ray_pkg_")
    return logs


def _line_value(logs: str, prefix: str) -> str:
    values = [line.removeprefix(prefix) for line in logs.splitlines() if line.startswith(prefix)]
    assert values, f"no line {prefix!r} in the job logs:\n{logs[-4000:]}"
    return values[-1]


def _round_metrics(run_dir: Path, r: int) -> dict:
    return json.loads((run_dir / "rounds" / f"round_{r:03d}" / "metrics.json").read_text())


def _labels(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "labels.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)
def test_stage_jobs_tapt_run_al_finetune_sweep_and_report(ray_head, tmp_path):
    """jobs/tapt.py, run_al.py, finetune.py, sweep.py and report.py, each submitted as the
    README and docs/cluster.md document them, in the order a cluster user runs them, on one run
    directory; each job must succeed and leave the files its stage writes."""
    config = str(_stage_config(tmp_path))
    runs = tmp_path / "runs"
    run_dir, full_dir = runs / "jobs", runs / "jobs-full"

    # TAPT (prepares first): the pre-trained backbone under <output_dir>/_tapt/<key>.
    logs = _run_job(ray_head, "tapt", ["jobs/tapt.py", "--config", config], STAGE_JOB_TIMEOUT_S)
    backbone = Path(_line_value(logs, "TAPT backbone: "))
    assert backbone.parent == runs / "_tapt"
    assert (backbone / "model.safetensors").stat().st_size > 0
    losses = json.loads((backbone / "tapt_losses.json").read_text())["loss_history"]
    assert len(losses) == 4
    assert (run_dir / "manifest.parquet").is_file()

    # The AL loop: two rounds of 12, starting from the TAPT job's model.
    logs = _run_job(ray_head, "run-al", ["jobs/run_al.py", "--config", config], STAGE_JOB_TIMEOUT_S)
    assert _line_value(logs, "run finished: ") == str(run_dir)
    state = json.loads((run_dir / "state.json").read_text())
    assert "finished" in state["stages"]
    assert Path(state["stages"]["tapt"]["backbone_dir"]) == backbone
    labels = _labels(run_dir)
    assert len(labels) == len({e["utt_id"] for e in labels}) == STAGE_ROUNDS * STAGE_PER_ROUND
    for r in range(STAGE_ROUNDS):
        m = _round_metrics(run_dir, r)
        assert m["n_labeled"] == (r + 1) * STAGE_PER_ROUND
        chosen = pq.read_table(run_dir / "rounds" / f"round_{r:03d}" / "selection.parquet")
        assert set(chosen["utt_id"].to_pylist()) == {e["utt_id"] for e in labels if e["round"] == r}
        assert f"test UA {m['test']['ua']:.3f}" in logs

    # The full-data reference, in <name>-full.
    logs = _run_job(
        ray_head, "finetune", ["jobs/finetune.py", "--config", config], STAGE_JOB_TIMEOUT_S
    )
    assert _line_value(logs, "full-data fine-tune finished: ") == str(full_dir)
    assert _round_metrics(full_dir, 0)["n_labeled"] == STAGE_POOL
    assert len(_labels(full_dir)) == STAGE_POOL

    # A 2-trial Ray Tune sweep inside the job: runs under <output_dir>/<name>/, then its report.
    axis = "al.strategy=" + ",".join(SWEEP_STRATEGIES)
    logs = _run_job(
        ray_head,
        "sweep",
        ["jobs/sweep.py", "--config", config, "--axis", axis, "--name", "jobsweep"],
        STAGE_JOB_TIMEOUT_S,
    )
    sweep_dir = runs / "jobsweep"
    assert "sweep jobsweep: 2 trials, 0 failed" in logs, logs[-4000:]
    assert _line_value(logs, "runs: ") == str(sweep_dir)
    sweep_report = Path(_line_value(logs, "report: "))
    assert sweep_report.is_file() and sweep_report.is_relative_to(sweep_dir)
    trials = sorted(p.parent for p in sweep_dir.glob("*/run_info.json"))
    strategies = {json.loads((t / "run_info.json").read_text())["strategy"]: t for t in trials}
    assert sorted(strategies) == sorted(SWEEP_STRATEGIES)
    for trial_dir in trials:
        m = _round_metrics(trial_dir, STAGE_ROUNDS - 1)
        assert m["labeled_fraction"] == pytest.approx(0.5)
        assert f"test UA {m['test']['ua']:.3f} at 50% labeled (round 1)" in logs
    assert (sweep_dir / "tune").is_dir()

    # The report, through the `ray job submit` command line itself, exactly as documented.
    out_dir = runs / "report"
    argv = ["jobs/report.py", str(run_dir), "--reference", str(full_dir), "--out", str(out_dir)]
    submitted = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit"]
        + ["--address", ray_head.address, "--working-dir", "."]
        + ["--submission-id", f"report-{os.getpid()}-{int(time.time())}", "--", "python", *argv],
        cwd=REPO,
        env=ray_head.environment(),
        capture_output=True,
        text=True,
        timeout=STAGE_JOB_TIMEOUT_S,
    )
    assert submitted.returncode == 0, (submitted.stdout[-4000:], submitted.stderr[-4000:])
    assert f"report: {out_dir / 'report.md'}" in submitted.stdout
    assert "succeeded" in (submitted.stdout + submitted.stderr).lower()
    md = (out_dir / "report.md").read_text()
    for r in range(STAGE_ROUNDS):
        m = _round_metrics(run_dir, r)
        row = (
            f"| {r} | {m['labeled_fraction'] * 100:.1f}% | {m['n_labeled']} | "
            f"{m['test']['ua'] * 100:.1f} | {m['test']['wa'] * 100:.1f} |"
        )
        assert row in md, (row, md)
    reference = _round_metrics(full_dir, 0)["test"]
    assert f"| full-data fine-tune | 1 (3) | 100.0% | {reference['ua'] * 100:.1f} |" in md
    assert (out_dir / "learning_curves.png").read_bytes().startswith(b"\x89PNG")

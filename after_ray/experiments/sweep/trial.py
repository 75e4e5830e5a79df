"""One sweep trial as a Ray Tune trainable: :class:`SweepTrial` runs an AL run and reports each
evaluated round as one Tune iteration, with a tiny checkpoint (the next round to report).
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.result import DONE

from after_ray import faults
from after_ray.config.sections import config_from_dict
from after_ray.errors import RunStateError
from after_ray.experiments.sweep.plan import TrialPlan
from after_ray.store.layout import round_metrics_path

POLL_SECONDS = 2.0
# How long a trial waits, after a round's metrics appear, for the run to end (is it the last?).
FINAL_GRACE_S = 3.0


def _tune_row(metrics: dict[str, Any], round_index: int, trial: str, run_dir: Path) -> dict:
    """What Tune shows for a round (numbers only are plotted in TensorBoard)."""
    test = metrics.get("test") or {}
    row = {
        "round": round_index,
        "labeled_fraction": metrics.get("labeled_fraction"),
        "n_labeled": metrics.get("n_labeled"),
        "test_ua": test.get("ua"),
        "test_wa": test.get("wa"),
        "test_macro_f1": test.get("macro_f1"),
        "wall_s": metrics.get("cumulative_wall_s"),
        "trial": trial,
        "run_dir": str(run_dir),
    }
    return {k: v for k, v in row.items() if v is not None}


class SweepTrial(tune.Trainable):
    """One sweep trial: an AL run whose rounds are Tune iterations.

    Why a class trainable and not a function trainable: in a Tune *function* trainable the
    process holds a Tune session, and Ray Train V2 then refuses its own API
    (``ray.train.get_context`` raises "deprecated when running in a function passed to Ray
    Tune", ray#49454) in that process; with ``ray.num_workers=0`` the training loop runs in the
    trial's process (Train local mode), so every fine-tune would fail. A class trainable has no
    such session. Each ``step()`` returns one round; checkpoints record the last round Tune has.
    """

    def setup(
        self,
        config: dict[str, Any],
        trial_configs: dict[str, dict[str, Any]],
        failpoints: dict[str, str] | None = None,
        trial_kinds: dict[str, str] | None = None,
    ) -> None:
        # The trial process does not inherit the driver's environment: the failpoints of a
        # crash test come with the trainable (faults.snapshot() in the driver).
        faults.install(failpoints)
        self.trial = config["trial"]["name"]
        self.al_config = config_from_dict(copy.deepcopy(trial_configs[self.trial]))
        self.kind = (trial_kinds or {}).get(self.trial, "al")
        self.run_dir = self.al_config.run_dir
        self.next_round = 0
        self.last_row: dict[str, Any] = {}
        self.outcome: dict[str, Any] = {}
        self.worker: threading.Thread | None = None

    def _start(self) -> None:
        from after_ray.pipeline.runner import run_active_learning

        def run() -> None:
            try:
                self.outcome["result"] = run_active_learning(self.al_config, kind=self.kind)
            except BaseException as exc:  # noqa: BLE001 - re-raised by step() in Tune's thread
                self.outcome["error"] = exc

        self.worker = threading.Thread(target=run, name=f"al-{self.trial}", daemon=True)
        self.worker.start()

    def _check_ended(self) -> None:
        """Raise the AL run's error, or RunStateError when it stopped without finishing."""
        if "error" in self.outcome:
            raise self.outcome["error"]
        result = self.outcome["result"]
        if not result.finished:
            raise RunStateError(
                f"sweep trial {self.trial!r}: the run in {self.run_dir} stopped before its last "
                f"round (waiting for labels of round {result.waiting_for_labels})"
            )

    def step(self) -> dict[str, Any]:
        """Wait for the next round's metrics.json (written atomically by the runner) or the end
        of the run. The run is done when its thread has ended and no round is left unreported;
        the last round is marked done at once when the thread ends within FINAL_GRACE_S of it."""
        if self.worker is None:
            self._start()
        assert self.worker is not None
        while True:
            ended = not self.worker.is_alive()  # read first, so a last round is never missed
            path = round_metrics_path(self.run_dir, self.next_round)
            if path.is_file():
                row = _tune_row(json.loads(path.read_text()), self.next_round, self.trial,
                                self.run_dir)  # fmt: skip
                self.next_round += 1
                if not ended:
                    self.worker.join(timeout=FINAL_GRACE_S)
                    ended = not self.worker.is_alive()
                last = ended and not round_metrics_path(self.run_dir, self.next_round).is_file()
                if last and "error" not in self.outcome and self.outcome["result"].finished:
                    row[DONE] = True  # (after an error the next step raises it)
                self.last_row = row
                return row
            if ended:
                self._check_ended()
                # Every round was reported before (a restored trial of a finished run, or a
                # last round whose thread ended late): repeat the last row to end the trial.
                return {**self.last_row, DONE: True}
            self.worker.join(timeout=POLL_SECONDS)

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        state = {"next_round": self.next_round, "last_row": self.last_row}
        (Path(checkpoint_dir) / "reported.json").write_text(json.dumps(state))

    def load_checkpoint(self, checkpoint: str) -> None:
        state = json.loads((Path(checkpoint) / "reported.json").read_text())
        self.next_round = int(state["next_round"])
        self.last_row = dict(state.get("last_row") or {})


def trial_name_of(trial) -> str:
    """Tune trial name / directory name: the readable trial name."""
    return str(trial.config["trial"]["name"])


def sweep_trainable(plans: list[TrialPlan], resources: dict[str, float]) -> Any:
    """:class:`SweepTrial` with every trial's config (and the driver's failpoints) bound to it,
    reserving ``resources`` for each trial's own process."""
    return tune.with_resources(
        tune.with_parameters(
            SweepTrial,
            trial_configs={p.name: p.config.to_dict() for p in plans},
            failpoints=faults.snapshot(),
            trial_kinds={p.name: p.kind for p in plans},
        ),
        resources,
    )

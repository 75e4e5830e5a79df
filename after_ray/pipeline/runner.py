"""The AFTER round loop: prepare -> TAPT -> embed -> cold start -> rounds of (fine-tune ->
evaluate -> score the pool -> select -> label) until the budget is spent.

Every step reads and writes the run directory through ``RunState`` and is skipped when its
output already exists, so ``run_active_learning`` on an existing directory resumes at the first
unfinished step. Each step is a pure function of the config, the seed and what earlier steps
wrote (fixed seeds per round, deterministic batches, cached scores), so a resumed run makes the
same selections as an uninterrupted one. Items are named by ``utt_id`` throughout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from after_ray.al.budget import Budget
from after_ray.al.oracle import SimulatedOracle, rows_by_id
from after_ray.al.pool import PoolView
from after_ray.al.strategies import Strategy, get_strategy
from after_ray.config.sections import Config
from after_ray.data import manifest
from after_ray.distributed.backend import RayBackend
from after_ray.errors import RunStateError
from after_ray.faults import failpoint
from after_ray.metrics import classification_report
from after_ray.store import layout
from after_ray.store.atomic import atomic_write_json, atomic_write_text
from after_ray.store.run_state import RunState

log = logging.getLogger(__name__)

# The TAPT loss of every step, written beside the TAPT model in its cache directory.
TAPT_LOSSES_FILE = "tapt_losses.json"


@dataclass
class RunOutcome:
    run_dir: Path
    finished: bool
    waiting_for_labels: int | None = None  # round whose labels a human oracle must supply


# ------------------------------------------------------------------------------------ helpers
def _identity(config: Config, kind: str) -> dict[str, Any]:
    """What defines the experiment: a resume with a different value is refused."""
    return {
        "kind": kind,
        "corpus": dataclasses.asdict(config.corpus),
        "seed": config.run.seed,
        "strategy": config.al.strategy,
        "strategy_params": config.al.strategy_params,
        "cold_start": config.al.cold_start,
        "budget": dataclasses.asdict(config.al.budget),
        "backbone": config.backbone.identity(),
        "tapt": dataclasses.asdict(config.tapt),
        # Only when not the default, so run dirs written before the key existed still resume.
        **({"finetune_mode": config.finetune.mode} if config.finetune.mode != "full" else {}),
    }


def _stable_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[
        :16
    ]


def _elapsed(state: RunState) -> float:
    """Wall time spent on this run so far, summed over stages (resumes do not count the gap)."""
    return float(sum(t["seconds"] for t in state.timings()))


def _seed(*parts: Any) -> int:
    return int(_stable_hash(parts), 16) % (2**31)


# -------------------------------------------------------------------------------------- stages
def stage_prepare(config: Config, state: RunState) -> None:
    if state.stage_info("prepare") is not None:
        return
    from after_ray.pipeline.prepare import prepare

    failpoint("stage:prepare")
    with state.timed("prepare"):
        result = prepare(config)
    print(f"prepare: {result.n_rows} utterances -> {result.manifest_path}", flush=True)
    print(result.summary, flush=True)
    state.mark_stage_done(
        "prepare", {"manifest_path": str(result.manifest_path), "quarantined": result.n_quarantined}
    )


def stage_tapt(config: Config, state: RunState, pool_rows: list[dict]) -> str:
    """The backbone every round starts from: TAPT output (cached across runs) or the config's."""
    info = state.stage_info("tapt")
    if info is not None:
        return info["backbone_dir"]
    if not config.tapt.enabled:
        state.mark_stage_done(
            "tapt", {"backbone_dir": config.backbone.name_or_path, "skipped": True}
        )
        return config.backbone.name_or_path
    # TAPT depends only on the pool audio and the settings: runs that share them (strategy arms,
    # the full-data reference) share one TAPT model under <output_dir>/_tapt/<key>.
    key = _stable_hash(
        {
            "pool": sorted(r["utt_id"] for r in pool_rows),
            "tapt": dataclasses.asdict(config.tapt),
            "backbone": config.backbone.identity(),
            "audio": dataclasses.asdict(config.audio),
        }
    )
    out_dir = (Path(config.run.output_dir) / "_tapt" / key).resolve()
    if not (out_dir / "config.json").is_file():
        failpoint("stage:tapt")
        print(f"tapt: {config.tapt.steps} steps on {len(pool_rows)} utterances ...", flush=True)
        with state.timed("tapt"):
            summary = RayBackend(config).tapt(pool_rows, name=f"tapt-{key}", out_dir=out_dir)
        losses = summary.get("loss_history") or []
        # Beside the model, so two runs can be compared step by step (the reproducibility check).
        atomic_write_json(out_dir / TAPT_LOSSES_FILE, {"loss_history": losses}, what="TAPT losses")
        if losses:
            head, tail = np.mean(losses[:10]), np.mean(losses[-10:])
            print(f"tapt: loss {head:.3f} -> {tail:.3f}", flush=True)
    else:
        print(f"tapt: reusing {out_dir}", flush=True)
    state.mark_stage_done("tapt", {"backbone_dir": str(out_dir)})
    return str(out_dir)


def _usable_model(model_dir: str | Path) -> bool:
    """True when ``model_dir`` holds a complete classifier. A damaged one (a disk error, a hand
    edit) is rebuilt by the caller: models are derived from the run state, never acquired."""
    from after_ray.models.classifier_io import verify_classifier_dir

    if not (Path(model_dir) / "classifier.json").is_file():
        return False
    try:
        verify_classifier_dir(model_dir)
    except RunStateError as exc:
        print(f"warning: {exc}. Rebuilding it.", flush=True)
        return False
    return True


def _embed_model(config: Config, state: RunState, backbone_dir: str, class_names) -> Path:
    """A classifier around the TAPT backbone (random head) for the cold-start embeddings."""
    path = config.run_dir / layout.EMBED_MODEL_DIR
    if not _usable_model(path):
        import torch

        from after_ray.models.backbones import load_backbone
        from after_ray.models.classifier import build_classifier
        from after_ray.models.classifier_io import save_classifier

        failpoint("stage:embed_model")
        backbone_cfg = dataclasses.replace(config.backbone, name_or_path=backbone_dir)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.run.seed)
            model = build_classifier(
                load_backbone(backbone_cfg, for_pretraining=False),
                len(class_names),
                config.finetune,
            )
        save_classifier(model, path, class_names=class_names, finetune_cfg=config.finetune)
    return path


def _score(config: Config, state: RunState, model_dir, rows, tag: str, round_index, stage=None):
    failpoint(f"stage:{stage or 'score_' + tag}")
    with state.timed(stage or f"score_{tag}", round_index):
        return RayBackend(config).score(
            rows, model_dir, cache_root=config.run_dir / layout.SCORES_DIR / tag
        )


def _pool_view(
    pool_ids: list[str],
    labeled: set[str],
    scores=None,
    durations=None,
    speakers: dict[str, Any] | None = None,
) -> PoolView:
    """The strategies' input. ``speakers`` maps utt_id -> the manifest's ``speaker`` value: the
    view carries them (for ``speaker_norm``) unless none is known, then it has no speakers."""
    ids = np.asarray(pool_ids, dtype=object)
    fields: dict[str, Any] = {}
    if scores is not None:
        s = scores.take(pool_ids)
        fields = {"probs": s.probs, "embeddings": s.embedding, "penultimate": s.penultimate}
        if s.mc_probs.shape[1] >= 2:
            fields["mc_probs"] = s.mc_probs
    if durations is not None:
        fields["durations"] = np.asarray([durations[u] for u in pool_ids], dtype=np.float64)
    if speakers is not None:
        # None / "" = unknown speaker; a pool with no known speaker keeps speakers=None so
        # speaker_norm=null falls back to raw distances (and speaker_norm=true says why not).
        values = [speakers.get(u) for u in pool_ids]
        values = ["" if v is None else str(v).strip() for v in values]
        if any(values):
            fields["speakers"] = np.asarray(values, dtype=object)
    return PoolView(
        utt_ids=ids, labeled=np.asarray([u in labeled for u in pool_ids], dtype=bool), **fields
    )


def _without_lost_files(config: Config, pool_rows: list[dict], scores) -> list[dict]:
    """The pool minus files the scoring stream dropped because they broke after prepare
    (deleted, truncated, overwritten); those go to the quarantine table with stage ``load``."""
    scored = set(scores.utt_ids)
    lost = [r for r in pool_rows if r["utt_id"] not in scored]
    if not lost:
        return pool_rows
    from after_ray.data.quarantine import csv_twin, quarantine_lost_files

    table_path = config.run_dir / layout.QUARANTINE_FILE
    quarantine_lost_files(lost, config.audio, table_path)
    print(
        f"quarantine: {len(lost)} pool files broke since prepare and are left out "
        f"(e.g. {lost[0]['path']}); see {csv_twin(table_path)}",
        flush=True,
    )
    return [r for r in pool_rows if r["utt_id"] in scored]


@dataclass(frozen=True)
class Selectors:
    """The run's cold start, its strategy and its budget, built once from the config."""

    cold_start: Strategy
    strategy: Strategy
    budget: Budget

    @classmethod
    def from_config(cls, config: Config) -> Selectors:
        return cls(
            cold_start=get_strategy(config.al.cold_start, **config.al.cold_start_params),
            strategy=get_strategy(config.al.strategy, **config.al.strategy_params),
            budget=Budget.from_config(config.al.budget),
        )

    def for_round(self, config: Config, round_index: int) -> tuple[str, dict[str, Any], Strategy]:
        """A round's configured name (it seeds the selection), its parameters and strategy."""
        if round_index == 0:
            return config.al.cold_start, config.al.cold_start_params, self.cold_start
        return config.al.strategy, config.al.strategy_params, self.strategy


def _select(
    config: Config,
    state: RunState,
    round_index: int,
    target,
    pool_rows,
    scores,
    durations: dict[str, float],
    selectors: Selectors,
) -> list[str]:
    labeled = set(state.labels())
    budget = selectors.budget
    votes = config.al.oracle.votes_per_item or 1
    if budget.unit == "seconds":
        spent = sum(durations[u] for u in labeled) * votes
        mean = float(np.mean(list(durations.values())))
        want = max(1, math.ceil((target - spent) / (mean * votes) * 1.5))
    else:
        spent = len(labeled)
        want = int(target - spent)
    name, params, strategy = selectors.for_round(config, round_index)
    if scores is not None:
        pool_rows = _without_lost_files(config, pool_rows, scores)
    pool_ids = sorted(r["utt_id"] for r in pool_rows)
    speakers = {r["utt_id"]: r.get("speaker") for r in pool_rows}
    view = _pool_view(pool_ids, labeled, scores, durations, speakers)
    failpoint("stage:select")
    with state.timed("select", round_index):
        ranked = strategy.select(
            view, min(want, view.n_unlabeled), seed=_seed(config.run.seed, round_index, name)
        )
    failpoint(f"select:{round_index}")  # ranked, not yet recorded
    chosen = budget.take(
        ranked, target=target, spent=spent, durations=durations, votes_per_item=votes
    )
    score_values = None
    try:
        all_scores = strategy.score(view)
    except Exception as exc:  # noqa: BLE001 - scores are for the record only
        # The picks are made and must be recorded; a failing score only loses the record of
        # why, so say so loudly instead of storing None as if the strategy had no score.
        log.warning(
            "round %d: %s picked %d items but its score() failed (%s: %s); selection.parquet "
            "records no scores for this round",
            round_index,
            name,
            len(chosen),
            type(exc).__name__,
            exc,
        )
        all_scores = None
    if all_scores is not None:
        by_id = dict(zip(pool_ids, np.asarray(all_scores, dtype=float), strict=True))
        score_values = [float(by_id[u]) for u in chosen]
    state.record_selection(
        round_index, chosen, score_values, strategy=name, extra={"params": params, "target": target}
    )
    return chosen


def _acquire_labels(
    config: Config, state: RunState, round_index: int, rows_by_utt, class_names, waiting: list
) -> bool:
    """Label the round's pending items. False when a human oracle still has to answer."""
    pending = state.pending_ids(round_index)
    if not pending:
        return True
    if config.al.oracle.kind == "human":
        from after_ray.pipeline.labeling import export_batch

        out_dir = config.run_dir / layout.LABELING_DIR
        csv_path, tasks_path = export_batch(
            state, round_index, [rows_by_utt[u] for u in pending], class_names, out_dir
        )
        print(
            f"round {round_index}: {len(pending)} utterances need labels. Give annotators\n"
            f"  {csv_path}  (fill the label column), or import {tasks_path} into Label Studio,\n"
            f"then run: after-ray label import {config.run_dir} <answers file> --round "
            f"{round_index}\nand run this command again to continue.",
            flush=True,
        )
        waiting.append(round_index)
        return False
    oracle = SimulatedOracle.from_config(config.al.oracle, rows_by_utt, class_names)
    failpoint("stage:label")
    with state.timed("label", round_index):
        state.append_labels(round_index, oracle.label(pending, round_index))
    return True


def _finetune_round(
    config: Config,
    state: RunState,
    round_index: int,
    backbone_dir,
    rows_by_utt,
    val_rows,
    class_names,
    features=None,
) -> str:
    ref = state.checkpoint(round_index)
    if ref is not None and _usable_model(ref):
        return ref
    labels = state.labels()
    train_rows = []
    for utt_id in sorted(labels):
        entry = labels[utt_id]
        row = dict(rows_by_utt[utt_id])
        row["label"], row["votes"] = entry["label"], entry.get("votes")
        train_rows.append(row)
    ft_cfg = dataclasses.replace(
        config.finetune, seed=_seed(config.finetune.seed, config.run.seed, round_index)
    )
    warm = None
    if ft_cfg.init == "warm" and round_index > 0:
        warm = state.checkpoint(round_index - 1)
    out_dir = layout.round_model_dir(config.run_dir, round_index).resolve()
    if features is not None:  # finetune.mode: head
        from after_ray.pipeline.head_rounds import train_round_head

        failpoint("stage:finetune")
        with state.timed("finetune", round_index):
            train_round_head(
                config,
                features,
                backbone_dir=backbone_dir,
                train_rows=train_rows,
                val_rows=val_rows,
                class_names=class_names,
                seed=ft_cfg.seed,
                out_dir=out_dir,
            )
            # Inside the timed block: the checkpoint is recorded before the stage's time, so a
            # crash between the two writes never makes a resumed run train the round again.
            state.record_checkpoint(round_index, str(out_dir))
        return str(out_dir)
    failpoint("stage:finetune")
    print(
        f"round {round_index}: fine-tuning on {len(train_rows)} labeled utterances ...", flush=True
    )
    with state.timed("finetune", round_index):
        summary = RayBackend(config).finetune(
            train_rows,
            val_rows,
            class_names,
            finetune_cfg=ft_cfg,
            backbone_dir=backbone_dir,
            name=f"{config.run.name}-finetune-r{round_index:03d}",
            out_dir=out_dir,
            warm_start_dir=warm,
        )
        atomic_write_json(out_dir.parent / "finetune_summary.json", summary)
        state.record_checkpoint(round_index, str(out_dir))  # before the time (see head mode)
    return str(out_dir)


def _evaluate(
    config: Config,
    state: RunState,
    round_index: int,
    model_dir,
    test_rows,
    class_names,
    pool_size: int,
    durations,
    features=None,
) -> dict:
    existing = state.metrics(round_index)
    if existing is not None:
        return existing
    if features is not None:  # finetune.mode: head: the head on cached test features
        failpoint("stage:score_test")
        with state.timed("score_test", round_index):
            test_ids = sorted(r["utt_id"] for r in test_rows if r["utt_id"] in features.utt_ids)
            scores = features.score(model_dir, test_ids, mc_samples=0, seed=config.run.seed)
    else:
        scores = _score(config, state, model_dir, test_rows, "test", round_index)
    index = {c: i for i, c in enumerate(class_names)}
    truth = {r["utt_id"]: r["label"] for r in test_rows}
    y_true = np.asarray([index[truth[u]] for u in scores.utt_ids])
    y_pred = scores.probs.argmax(axis=1)
    report = classification_report(y_true, y_pred, class_names)
    summary_path = Path(model_dir).parent / "finetune_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    labels = state.labels()
    this_round = [e["label"] for e in labels.values() if e["round"] == round_index]
    votes = config.al.oracle.votes_per_item or 1
    metrics = {
        "round": round_index,
        "n_labeled": len(labels),
        "labeled_fraction": len(labels) / pool_size,
        "annotator_seconds": sum(durations[u] for u in labels) * votes,
        "strategy": config.al.cold_start if round_index == 0 else config.al.strategy,
        "best_epoch": summary.get("best_epoch"),
        "test": report,
        "val": summary.get("best_val_report"),
        "cumulative_wall_s": _elapsed(state),
        "selected_class_counts": {c: this_round.count(c) for c in class_names},
    }
    state.record_metrics(round_index, metrics)
    print(
        f"round {round_index}: {len(labels)} labels ({metrics['labeled_fraction']:.0%}) -> "
        f"test UA {report['ua']:.3f}, WA {report['wa']:.3f}, macro-F1 {report['macro_f1']:.3f}",
        flush=True,
    )
    return metrics


# ------------------------------------------------------------------------------------- the loop
def run_active_learning(config: Config, *, kind: str = "al") -> RunOutcome:
    """Run (or resume) the whole AFTER loop for ``config`` in ``config.run_dir``."""
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    # Built once, before any stage: a parameter a strategy does not take fails here, not after
    # TAPT and a round.
    selectors = Selectors.from_config(config)
    with RunState.open(run_dir) as state:
        state.ensure_experiment(_identity(config, kind))
        atomic_write_text(run_dir / layout.CONFIG_FILE, config.to_yaml())
        stage_prepare(config, state)
        table = manifest.read_manifest(layout.manifest_path(run_dir))
        splits = manifest.SplitRows.of(table, config.corpus.classes)
        rows, pool_rows, val_rows, test_rows = splits.rows, splits.pool, splits.val, splits.test
        if not pool_rows or not test_rows or not val_rows:
            raise RunStateError(
                f"the manifest in {run_dir} needs train, val and test rows (got {len(pool_rows)}, "
                f"{len(val_rows)}, {len(test_rows)}); check corpus.split"
            )
        class_names = splits.class_names
        rows_by_utt = rows_by_id(rows)
        durations = {r["utt_id"]: float(r["duration_s"]) for r in pool_rows}
        _write_run_info(config, kind, len(pool_rows), class_names)

        backbone_dir = stage_tapt(config, state, pool_rows)
        features = _feature_space(config, state, backbone_dir, rows, class_names)
        budget = selectors.budget
        votes = config.al.oracle.votes_per_item or 1
        schedule = budget.schedule(
            durations if budget.unit == "seconds" else len(pool_rows), votes_per_item=votes
        )
        waiting: list[int] = []
        previous_model: str | None = None
        for round_index, target in enumerate(schedule):
            if state.selection(round_index) is None:
                if features is not None:
                    scores = _head_mode_scores(
                        config, state, round_index, features, pool_rows, previous_model
                    )
                elif round_index == 0:
                    scores = None
                    if selectors.cold_start.requires:
                        embed_dir = _embed_model(config, state, backbone_dir, class_names)
                        scores = _score(
                            config, state, embed_dir, pool_rows, "pool", 0, stage="embed"
                        )
                elif selectors.strategy.requires:
                    scores = _score(config, state, previous_model, pool_rows, "pool", round_index)
                else:
                    scores = None  # e.g. random selection: no model outputs needed
                chosen = _select(
                    config, state, round_index, target, pool_rows, scores, durations, selectors
                )
                print(
                    f"round {round_index}: selected {len(chosen)} utterances "
                    f"({config.al.cold_start if round_index == 0 else config.al.strategy})",
                    flush=True,
                )
            if not _acquire_labels(config, state, round_index, rows_by_utt, class_names, waiting):
                return RunOutcome(run_dir, finished=False, waiting_for_labels=round_index)
            previous_model = _finetune_round(
                config,
                state,
                round_index,
                backbone_dir,
                rows_by_utt,
                val_rows,
                class_names,
                features,
            )
            _evaluate(
                config,
                state,
                round_index,
                previous_model,
                test_rows,
                class_names,
                len(pool_rows),
                durations,
                features,
            )
        state.mark_stage_done("finished", {"rounds": len(schedule)})
    return RunOutcome(run_dir, finished=True)


def _head_mode_scores(
    config: Config, state: RunState, round_index: int, features, pool_rows, model_dir
):
    """The pool's scores in ``finetune.mode: head``: the cached features before any model
    exists (cold start), then the previous round's head applied to them."""
    pool_ids = sorted(r["utt_id"] for r in pool_rows if r["utt_id"] in features.utt_ids)
    if round_index == 0:
        return features.cold_start_scores(pool_ids)
    failpoint("stage:score_pool")
    with state.timed("score_pool", round_index):
        return features.score(
            model_dir, pool_ids, mc_samples=config.al.mc_dropout_samples, seed=config.run.seed
        )


def _write_run_info(config: Config, kind: str, pool_size: int, class_names) -> None:
    path = config.run_dir / layout.RUN_INFO_FILE
    if path.is_file():
        return
    atomic_write_json(
        path,
        {
            "kind": kind,
            "name": config.run.name,
            "strategy": "full_data" if kind == "full_data" else config.al.strategy,
            "cold_start": config.al.cold_start,
            "seed": config.run.seed,
            "corpus": config.corpus.name,
            "backbone": config.backbone.name_or_path,
            "tapt": config.tapt.enabled,
            "pool_size": pool_size,
            "class_names": list(class_names),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )


def full_data_config(config: Config) -> Config:
    """The reference every AL curve is compared with: fine-tune on the whole labeled pool."""
    al = dataclasses.replace(
        config.al,
        cold_start="random",
        budget=dataclasses.replace(
            config.al.budget, unit="fraction", initial=1.0, per_round=1.0, max_total=1.0
        ),
    )
    run = dataclasses.replace(config.run, name=f"{config.run.name}-full")
    return dataclasses.replace(config, al=al, run=run)


def run_full_data(config: Config) -> RunOutcome:
    return run_active_learning(full_data_config(config), kind="full_data")


# ------------------------------------------------------------------- single stages for the CLI
def _open_prepared(config: Config, state: RunState) -> manifest.SplitRows:
    state.ensure_experiment(_identity(config, "al"))
    atomic_write_text(config.run_dir / layout.CONFIG_FILE, config.to_yaml())
    stage_prepare(config, state)
    table = manifest.read_manifest(layout.manifest_path(config.run_dir))
    return manifest.SplitRows.of(table, config.corpus.classes)


def _feature_space(config: Config, state: RunState, backbone_dir: str, rows, class_names):
    """``finetune.mode: head``: the cached features of every labeled-or-pool row; else None."""
    if config.finetune.mode != "head":
        return None
    from after_ray.pipeline.head_rounds import FeatureSpace

    # Pool rows (labeled or not) and every labeled row: what a round trains, scores or tests.
    used = [r for r in rows if r["split"] == "train" or r["label"] is not None]
    pool_ids = [r["utt_id"] for r in rows if r["split"] == "train"]
    return FeatureSpace.build(config, state, backbone_dir, used, pool_ids, class_names)


def run_shared_stages_only(config: Config) -> str:
    """Prepare, TAPT and (``finetune.mode: head``) the feature pass: what every arm of a sweep
    shares, run once before the trials start. Returns the backbone directory."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    with RunState.open(config.run_dir) as state:
        splits = _open_prepared(config, state)
        backbone_dir = stage_tapt(config, state, splits.pool)
        _feature_space(config, state, backbone_dir, splits.rows, splits.class_names)
        return backbone_dir


def run_tapt_only(config: Config) -> str:
    """Prepare (if needed) and run TAPT; returns the pre-trained backbone's directory."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    with RunState.open(config.run_dir) as state:
        return stage_tapt(config, state, _open_prepared(config, state).pool)


def score_with_model(config: Config, model_dir: str, *, split: str = "train") -> Path:
    """Score a split of the run's manifest with a classifier directory; returns the cache dir."""
    from after_ray.distributed.scoring import cache_key

    config.run_dir.mkdir(parents=True, exist_ok=True)
    with RunState.open(config.run_dir) as state:
        chosen = _open_prepared(config, state).split(split)
        scores = _score(config, state, model_dir, chosen, split, None)
    print(f"scored {len(scores.utt_ids)} utterances of split {split!r}")
    key = cache_key(model_dir, config.al.mc_dropout_samples, config.run.seed, config.audio)
    return config.run_dir / layout.SCORES_DIR / split / key


def export_round_model(run_dir: Path, out_dir: str, *, round_index: int | None = None) -> Path:
    """A round's classifier as a Hugging Face audio-classification directory."""
    from after_ray.models.classifier_io import load_classifier
    from after_ray.models.export import export_hf
    from after_ray.store.run_state import list_rounds

    rounds = [
        r
        for r in list_rounds(run_dir)
        if (layout.round_model_dir(run_dir, r) / "classifier.json").is_file()
    ]
    if not rounds:
        raise RunStateError(f"{run_dir} has no trained round yet: run `after-ray run` first")
    chosen = rounds[-1] if round_index is None else round_index
    if chosen not in rounds:
        raise RunStateError(f"round {chosen} of {run_dir} has no model; trained rounds: {rounds}")
    model, class_names = load_classifier(layout.round_model_dir(run_dir, chosen))
    return export_hf(model, class_names, out_dir)

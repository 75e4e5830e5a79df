"""The tiny AL run the end-to-end and crash tests share: its config, and what a run acquired."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from after_ray.store.run_state import RunState

BALANCED_CLEAN = {"class_priors": {}, "duplicate_fraction": 0.0, "low_quality_fraction": 0.0}

# 48-utterance pool (6 synth speakers), TAPT 8 steps, 3 rounds of 12, local-mode training.
TINY = {
    "run": {"name": "tiny", "seed": 3},
    "corpus": {
        "name": "synth",
        # Balanced and clean (the config's defaults are natural-corpus skewed and noisy): the
        # tests count on every emotion in every split of 6 voices.
        "synth": {"n_speakers": 6, "utterances_per_emotion": 3, "seed": 1, **BALANCED_CLEAN},
        "split": {"method": "speaker", "val_fraction": 0.17, "test_fraction": 0.17, "seed": 0},
    },
    "tapt": {"steps": 8, "warmup_steps": 2, "checkpoint_every": 4, "batch_size": 8},
    "finetune": {"epochs": 2, "batch_size": 8},
    "al": {
        "strategy": "after",
        "cold_start": "after_init",
        "mc_dropout_samples": 2,
        "budget": {"unit": "fraction", "initial": 0.25, "per_round": 0.25, "max_total": 0.75},
    },
    "ray": {"num_workers": 0, "scoring_batch_size": 8},
}


def tiny_config(tmp: Path, corpus_root: Path, **sections) -> dict:
    """TINY with the output dir and corpus root set; ``sections`` update its sections."""
    data = copy.deepcopy(TINY)
    data["run"]["output_dir"] = str(tmp / "runs")
    data["corpus"]["root"] = str(corpus_root)
    for name, values in sections.items():
        data[name].update(values)
    return data


def tiny_config_file(tmp: Path, corpus_root: Path, **sections) -> Path:
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp, corpus_root, **sections)))
    return path


def synth_corpus(root: Path) -> Path:
    from after_ray.data.corpora.synth import synthesize_corpus

    s = TINY["corpus"]["synth"]
    return synthesize_corpus(
        root,
        n_speakers=s["n_speakers"],
        utterances_per_emotion=s["utterances_per_emotion"],
        seed=s["seed"],
    )


def outcome(run_dir: Path) -> dict:
    """Everything acquired: selections per round, labels, and test metrics."""
    with RunState.open(run_dir) as state:
        rounds = state.rounds()
        return {
            "selections": {r: state.selection(r) for r in rounds},
            "labels": {
                u: (e["label"], e.get("votes"), e["round"]) for u, e in state.labels().items()
            },
            "ua": {r: state.metrics(r)["test"]["ua"] for r in rounds},
            "confusion": {r: state.metrics(r)["test"]["confusion"] for r in rounds},
        }

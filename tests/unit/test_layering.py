"""The layering the package promises: a config loads, and the AL core selects, with no torch,
Ray or audio stack importable; and a config names only strategies that exist."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from after_ray.config.sections import load_config
from after_ray.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

BLOCKED = ("torch", "ray", "soundfile", "soxr", "transformers", "faiss", "pyarrow")

_BLOCKING_CHILD = f"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"blocked in this test: {{name}}")
        return None

sys.meta_path.insert(0, Block())

import numpy as np
from after_ray.config.sections import load_config
from after_ray.al.pool import PoolView
from after_ray.al.strategies import get_strategy

config = load_config("configs/demo.yaml", ["al.strategy=margin", "al.strategy_params={{}}"])
assert config.al.strategy == "margin"
pool = PoolView(
    utt_ids=[f"u{{i}}" for i in range(6)],
    labeled=np.array([True, False, False, False, False, False]),
    probs=np.array([[0.9, 0.1], [0.5, 0.5], [0.6, 0.4], [0.99, 0.01], [0.55, 0.45], [0.8, 0.2]]),
)
print(get_strategy("margin").select(pool, 2, seed=0))
"""


def test_config_and_al_core_load_and_select_with_torch_ray_and_audio_blocked():
    done = subprocess.run(
        [sys.executable, "-c", _BLOCKING_CHILD],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    # Margin picks the two closest to the decision boundary among the unlabeled.
    assert done.stdout.strip() == "['u1', 'u4']"


@pytest.mark.parametrize("key", ["al.strategy", "al.cold_start"])
def test_an_unknown_strategy_name_fails_when_the_config_loads(key):
    with pytest.raises(ConfigError, match=rf"{key}: unknown selection strategy 'aftr'"):
        load_config(REPO / "configs" / "demo.yaml", [f"{key}=aftr"])


def test_the_config_names_exactly_the_corpora_that_have_a_loader():
    # The config checks corpus.name without importing the loaders (and their audio stack);
    # "synth" and "merged" are composed by prepare from the loaders below.
    from after_ray.config.sections import CORPUS_NAMES
    from after_ray.data.corpora import LOADERS

    assert set(CORPUS_NAMES) == set(LOADERS) | {"synth", "merged"}

"""Corpus loaders: a corpus on disk -> manifest rows (without durations; prepare adds them).

Each loader is ``load(root, **options) -> list[dict]`` in a module of its own, returning rows
sorted by utt_id with canonical label names (``labels.CANONICAL``); ``load_corpus`` picks one by
name, after checking that every option is one that loader understands (a typo such as
``include_songs`` is a ConfigError, never silently ignored).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from after_ray.data.corpora import (
    cremad,
    emodb,
    folders,
    generic_csv,
    iemocap,
    msp_podcast,
    ravdess,
    savee,
)
from after_ray.errors import ConfigError, CorpusError

Loader = Callable[..., list[dict[str, Any]]]

# Corpora read straight from disk. "synth" (the demo corpus, written in the generic CSV layout by
# corpora/synth.py and read with the "csv" loader) and "merged" (several of these joined by
# corpora/merge.py) are composed on top of these by the prepare stage (after_ray/pipeline/prepare.py).
LOADERS: dict[str, Loader] = {
    "iemocap": iemocap.load,
    "savee": savee.load,
    "ravdess": ravdess.load,
    "cremad": cremad.load,
    "emodb": emodb.load,
    "msp_podcast": msp_podcast.load,
    "csv": generic_csv.load,
    "folders": folders.load,
}


def load_corpus(name: str, root: str | Path, **options: Any) -> list[dict[str, Any]]:
    """Rows of corpus ``name`` found at ``root``; ``options`` go to that corpus's loader."""
    loader = LOADERS.get(name)
    if loader is None:
        raise CorpusError(
            f"unknown corpus {name!r}; loaders: {', '.join(sorted(LOADERS))} "
            "(set corpus.name to one of them)"
        )
    check_options(name, options)
    return loader(root, **options)


def loader_options(name: str) -> list[str]:
    """The keyword options the loader of corpus ``name`` accepts."""
    parameters = inspect.signature(LOADERS[name]).parameters.values()
    return [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]


def check_options(name: str, options: dict[str, Any]) -> None:
    valid = loader_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(
            f"corpus.options: {', '.join(unknown)} not understood by the {name} loader; "
            f"valid options: {', '.join(valid) or 'none'}"
        )

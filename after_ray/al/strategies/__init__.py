"""Selection strategies behind one interface, and the registry that names them.

Every strategy is a :class:`Strategy` subclass with ``name``, ``requires`` (the
:class:`~after_ray.al.pool.PoolView` fields it reads) and
``select(pool, batch_size, *, seed) -> list[str]`` (utt_ids in selection order). The contract
and the tie rule are in ``base.py``; each module's docstring states its algorithm exactly.

==================  =====================================  ===================================
name                requires                               parameters (defaults)
==================  =====================================  ===================================
random              -                                      -
entropy             probs                                  -
least_confidence    probs                                  -
margin              probs                                  -
bald                mc_probs (T >= 2)                      -
coreset             embeddings                             speaker_norm (auto)
badge               probs, penultimate                     -
cluster_margin      probs, embeddings                      n_clusters (ceil(sqrt N)),
                                                           margin_pool_factor (10),
                                                           kmeans_niter (20)
typiclust           embeddings                             max_clusters (500), knn (20),
                                                           min_cluster_size (5),
                                                           kmeans_niter (20), speaker_norm
                                                           (auto)
after_init          embeddings                             n_clusters (elbow), max_clusters
                                                           (10), kmeans_niter (20),
                                                           kmeans_n_init (5), speaker_norm
                                                           (auto)
alps                embeddings                             kmeans_niter (20), kmeans_n_init
                                                           (3), speaker_norm (auto)
after               probs or mc_probs, embeddings          uncertainty ("margin"),
                                                           prefilter_factor (4), speaker_norm
                                                           (auto), balance (false)
==================  =====================================  ===================================

``speaker_norm``: None ("auto", the default) z-scores the embeddings per speaker before any
distance when the pool carries speaker ids (``PoolView.speakers``), False never does, True
requires the ids (``base.speaker_standardize``). No strategy reads a label: ``alps`` is ALPS
without the label leakage of AFTER's code (see ``alps.py``).

Names are matched case-insensitively and ``-`` is read as ``_`` (``cluster-margin`` works).
"""

from __future__ import annotations

import inspect
from typing import Any

from after_ray.al.strategies.alps import ALPSSampling
from after_ray.al.strategies.badge import BadgeSampling
from after_ray.al.strategies.bald import BALDSampling
from after_ray.al.strategies.base import Strategy
from after_ray.al.strategies.cluster_margin import ClusterMarginSampling
from after_ray.al.strategies.cold_start import AfterInit
from after_ray.al.strategies.coreset import CoresetSampling
from after_ray.al.strategies.hybrid import AfterHybrid
from after_ray.al.strategies.random_ import RandomSampling
from after_ray.al.strategies.typiclust import TypiClustSampling
from after_ray.al.strategies.uncertainty import (
    EntropySampling,
    LeastConfidenceSampling,
    MarginSampling,
)
from after_ray.errors import ConfigError

__all__ = [
    "STRATEGIES",
    "ALPSSampling",
    "AfterHybrid",
    "AfterInit",
    "BALDSampling",
    "BadgeSampling",
    "ClusterMarginSampling",
    "CoresetSampling",
    "EntropySampling",
    "LeastConfidenceSampling",
    "MarginSampling",
    "RandomSampling",
    "Strategy",
    "TypiClustSampling",
    "get_strategy",
    "strategy_params",
]

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        RandomSampling,
        EntropySampling,
        LeastConfidenceSampling,
        MarginSampling,
        BALDSampling,
        CoresetSampling,
        BadgeSampling,
        ClusterMarginSampling,
        TypiClustSampling,
        AfterInit,
        ALPSSampling,
        AfterHybrid,
    )
}


def _canonical(name: object) -> str:
    return str(name).strip().lower().replace("-", "_")


def strategy_params(name: str) -> dict[str, Any]:
    """The parameters a strategy accepts and their defaults (for ``validate`` and ``ls``)."""
    cls = _lookup(name)
    signature = inspect.signature(cls.__init__)
    return {
        p.name: p.default
        for p in signature.parameters.values()
        if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD
    }


def _lookup(name: str) -> type[Strategy]:
    cls = STRATEGIES.get(_canonical(name))
    if cls is None:
        raise ConfigError(
            f"unknown selection strategy {name!r}; valid names: {', '.join(sorted(STRATEGIES))}"
        )
    return cls


def get_strategy(name: str, **params: Any) -> Strategy:
    """A configured strategy by registry name; unknown names or parameters raise ConfigError."""
    cls = _lookup(name)
    accepted = strategy_params(name)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        valid = ", ".join(accepted) if accepted else "none"
        raise ConfigError(
            f"strategy {cls.name!r} does not take parameter(s) {unknown}; it accepts: {valid}"
        )
    return cls(**params)

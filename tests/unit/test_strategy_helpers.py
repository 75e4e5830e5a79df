"""The strategy base class, its helpers and the registry, on hand-computed values.

``top_k``, ``l2_normalize``, ``speaker_standardize`` and ``cover_clusters`` against brute-force
loops; the uncertainty scores on values worked out by hand; the contract checks of
``Strategy.select`` with strategies broken on purpose; every parameter and pool refusal with its
whole message (the messages name the strategy, the parameter and the fix).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from after_ray.al.pool import PoolError, PoolView
from after_ray.al.strategies import get_strategy
from after_ray.al.strategies.bald import bald_scores
from after_ray.al.strategies.base import (
    Strategy,
    cover_clusters,
    l2_normalize,
    speaker_standardize,
    top_k,
)
from after_ray.al.strategies.uncertainty import entropy, least_confidence, top2_margin
from after_ray.errors import ConfigError

IDS = np.array(["a", "b", "c", "d"])


def _pool(**fields) -> PoolView:
    return PoolView(utt_ids=IDS, labeled=np.zeros(4, dtype=bool), **fields)


# ---------------------------------------------------------------------------- scores


def test_uncertainty_scores_by_hand():
    probs = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    np.testing.assert_allclose(
        entropy(probs),
        [0.0, math.log(2), -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))],
        rtol=1e-15,
    )
    np.testing.assert_allclose(least_confidence(probs), [0.0, 0.5, 0.5], rtol=1e-15)
    np.testing.assert_allclose(top2_margin(probs), [1.0, 0.0, 0.2], atol=1e-15)
    # A float32 softmax that dips a hair below 0 counts as 0 (0 log 0 = 0, never NaN).
    assert entropy(np.array([[1.0, -1e-6]]))[0] == 0.0
    # entropy works on any leading shape ([N, T, C] for BALD).
    assert entropy(np.full((2, 3, 4), 0.25)).shape == (2, 3)


def test_scores_are_float64_whatever_the_input_dtype():
    rng = np.random.default_rng(0)
    p32 = rng.dirichlet(np.ones(5), size=50).astype(np.float32)
    for f in (entropy, least_confidence, top2_margin):
        out = f(p32)
        assert out.dtype == np.float64
        np.testing.assert_array_equal(out, f(p32.astype(np.float64)))
    mc = rng.dirichlet(np.ones(3), size=(20, 4)).astype(np.float32)
    assert bald_scores(mc).dtype == np.float64
    np.testing.assert_array_equal(bald_scores(mc), bald_scores(mc.astype(np.float64)))


def test_margin_is_the_gap_between_the_two_largest_probabilities():
    rng = np.random.default_rng(1)
    for n_classes in (6, 200):  # 200: numpy's partition no longer sorts the whole row
        p = rng.dirichlet(np.ones(n_classes), size=300)
        s = np.sort(p, axis=1)
        np.testing.assert_array_equal(top2_margin(p), s[:, -1] - s[:, -2])


def test_bald_by_hand_and_needs_two_samples():
    # Two samples that disagree completely: H[mean] = log 2, mean H = 0.
    mc = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [0.5, 0.5]]])
    np.testing.assert_allclose(bald_scores(mc), [math.log(2), 0.0], atol=1e-15)
    two = _pool(mc_probs=np.concatenate([mc, mc]))
    assert get_strategy("bald").select(two, 2, seed=0) == ["a", "c"]
    with pytest.raises(PoolError) as err:
        get_strategy("bald").select(_pool(mc_probs=np.full((4, 1, 3), 1 / 3)), 1, seed=0)
    assert str(err.value) == (
        "strategy 'bald' needs at least 2 Monte-Carlo dropout samples per item, the pool has 1; "
        "set al.mc_dropout_samples >= 2"
    )


# ---------------------------------------------------------------------------- top_k


def test_top_k_equals_a_sort_by_score_then_id():
    rng = np.random.default_rng(2)
    ids = np.array([f"u{i:03d}" for i in rng.permutation(40)])
    for trial in range(30):
        n = int(rng.integers(1, 40))
        positions = rng.choice(40, size=n, replace=False)
        scores = rng.integers(0, 4, size=n).astype(np.float64)  # many ties
        for k in range(0, n + 2):
            want = sorted(range(n), key=lambda i: (-scores[i], ids[positions[i]]))[:k]
            got = top_k(scores, positions, ids, k)
            assert got.dtype == np.int64
            assert got.tolist() == positions[want].tolist(), (trial, k)
    assert top_k([1.0, 2.0], [0, 1], ids, -1).size == 0
    assert top_k([], [], ids, 3).size == 0


# ---------------------------------------------------------------------------- geometry helpers


def test_l2_normalize_keeps_zero_rows_and_returns_float32():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]])  # float64 in
    out = l2_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.array([[0.6, 0.8], [0, 0], [0, -1]], dtype=np.float32))


def _speaker_reference(x, speakers):
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    for s in set(speakers):
        rows = [i for i, v in enumerate(speakers) if v == s]
        block = x[rows]
        mean = block.mean(axis=0)
        std = block.std(axis=0)
        scale = np.ones_like(std) if len(rows) < 2 else np.maximum(std, 1e-6)
        out[rows] = (block - mean) / scale
    return out


def test_speaker_standardize_equals_a_per_speaker_loop_in_float64():
    rng = np.random.default_rng(3)
    speakers = [f"s{i}" for i in rng.integers(0, 5, size=300)] + ["solo"]
    # A large offset and a small spread: float32 sums would lose the spread.
    x = (1.0e4 + rng.standard_normal((301, 7)) * 1e-2).astype(np.float32)
    x[:, 3] = 5.0  # constant dimension: centred to 0, never divided by ~0
    out = speaker_standardize(x, np.array(speakers))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _speaker_reference(x, speakers), rtol=1e-5, atol=1e-5)
    assert (out[-1] == 0).all()  # a speaker with one row becomes the zero vector
    assert (out[:, 3] == 0).all()
    assert speaker_standardize(np.ones((1, 2)), ["x"]).tolist() == [[0.0, 0.0]]
    assert speaker_standardize(np.ones((0, 2)), []).shape == (0, 2)


@pytest.mark.parametrize(
    "x, speakers, message",
    [
        (np.ones(3), ["a"] * 3, "speaker_standardize expects [N, D] embeddings, got shape (3,)"),
        (np.ones((3, 2)), ["a"] * 2, "speaker_standardize: 2 speaker ids for 3 rows"),
        (np.ones((3, 2)), "a", "speaker_standardize: 0 speaker ids for 3 rows"),
    ],
)
def test_speaker_standardize_refusals(x, speakers, message):
    with pytest.raises(PoolError) as err:
        speaker_standardize(x, speakers)
    assert str(err.value) == message


def test_speaker_norm_true_without_speakers_says_how_to_fix_it():
    pool = _pool(embeddings=np.eye(4))
    with pytest.raises(PoolError) as err:
        get_strategy("coreset", speaker_norm=True).select(pool, 1, seed=0)
    assert str(err.value) == (
        "strategy 'coreset' has speaker_norm=true, but the pool has no speaker ids "
        "(PoolView.speakers is None: the manifest's speaker column is missing or empty). Give the "
        "corpus speaker ids, or set speaker_norm to null (normalise when ids exist) or false"
    )


# ---------------------------------------------------------------------------- cover_clusters


def test_cover_clusters_hands_members_in_position_order():
    rng = np.random.default_rng(4)
    assignment = rng.integers(0, 3, size=200)
    labeled = np.zeros(200, dtype=bool)
    labeled[rng.choice(200, size=30, replace=False)] = True
    seen = {}

    def member_order(c, members):
        seen[c] = members.tolist()
        return members  # as given

    picks = cover_clusters(assignment, labeled, 200, member_order)
    for c, members in seen.items():
        assert members == [i for i in range(200) if assignment[i] == c and not labeled[i]]
    assert sorted(picks.tolist()) == np.flatnonzero(~labeled).tolist()
    empty = cover_clusters(np.empty(0, dtype=np.int64), np.zeros(0, dtype=bool), 3, member_order)
    assert empty.dtype == np.int64 and empty.size == 0
    none = cover_clusters(assignment, labeled, 0, member_order)
    assert none.dtype == np.int64 and none.size == 0


# ---------------------------------------------------------------------------- Strategy.select


class _Broken(Strategy):
    name = "broken"

    def __init__(self, picks):
        self.picks = picks

    def _select(self, pool, k, seed):
        return self.picks


@pytest.mark.parametrize(
    "picks, message",
    [
        ([0], "strategy 'broken' returned 1 items, expected 2"),
        ([0, 4], "strategy 'broken' returned a position outside the pool"),
        ([-1, 0], "strategy 'broken' returned a position outside the pool"),
        ([0, 1], "strategy 'broken' returned an already labeled item"),
        ([2, 2], "strategy 'broken' returned the same item twice"),
    ],
)
def test_a_strategy_that_breaks_the_contract_fails_loudly(picks, message):
    pool = PoolView(utt_ids=IDS, labeled=np.array([False, True, False, False]))
    with pytest.raises(RuntimeError) as err:
        _Broken(picks).select(pool, 2, seed=0)
    assert str(err.value) == message
    assert _Broken([2, 0]).select(pool, 2, seed=0) == ["c", "a"]


def test_select_refusals_and_repr():
    pool = _pool()
    cases = [
        (
            lambda: get_strategy("entropy").select("x", 1, seed=0),
            TypeError,
            "entropy: pool must be a PoolView, got str",
        ),
        (
            lambda: get_strategy("entropy").select(pool, 1, seed=0),
            PoolError,
            "strategy 'entropy' needs PoolView field(s) ['probs'], which the pool does not have (it "
            "has none). Score the pool with outputs for ['probs'], or choose another strategy",
        ),
        (
            lambda: get_strategy("random").select(pool, 1, seed=True),
            PoolError,
            "random: seed must be a non-negative int, got True",
        ),
        (
            lambda: get_strategy("random").select(pool, 1, seed=2.5),
            PoolError,
            "random: seed must be a non-negative int, got 2.5",
        ),
        (
            lambda: Strategy().select(pool, 1, seed=0),
            NotImplementedError,
            "strategy '': _select is not built yet",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error) as err:
            call()
        assert str(err.value) == message
    assert repr(get_strategy("after")) == (
        "AfterHybrid(uncertainty='margin', prefilter_factor=4.0, speaker_norm=None, balance=False)"
    )
    assert (
        repr(get_strategy("coreset", speaker_norm=False)) == "CoresetSampling(speaker_norm=False)"
    )
    assert repr(get_strategy("random")) == "RandomSampling()"


# ---------------------------------------------------------------------------- parameters


@pytest.mark.parametrize(
    "name, params, message",
    [
        (
            "nope",
            {},
            "unknown selection strategy 'nope'; valid names: after, after_init, alps, "
            "badge, bald, cluster_margin, coreset, entropy, least_confidence, margin, random, typiclust",
        ),
        (
            "random",
            {"k": 1},
            "strategy 'random' does not take parameter(s) ['k']; it accepts: none",
        ),
        (
            "after",
            {"k": 1},
            "strategy 'after' does not take parameter(s) ['k']; it accepts: "
            "uncertainty, prefilter_factor, speaker_norm, balance",
        ),
        (
            "coreset",
            {"speaker_norm": "yes"},
            "parameter 'speaker_norm' of strategy 'coreset' must be "
            "true, false or null (null: on when the pool has speaker ids), got 'yes'",
        ),
        (
            "typiclust",
            {"knn": 0},
            "parameter 'knn' of strategy 'typiclust' must be an int >= 1, got 0",
        ),
        (
            "typiclust",
            {"knn": True},
            "parameter 'knn' of strategy 'typiclust' must be an int >= 1, got True",
        ),
        (
            "typiclust",
            {"knn": 2.5},
            "parameter 'knn' of strategy 'typiclust' must be an int >= 1, got 2.5",
        ),
        (
            "cluster_margin",
            {"n_clusters": 0},
            "parameter 'n_clusters' of strategy 'cluster_margin' must be an int >= 1, got 0",
        ),
        (
            "after",
            {"prefilter_factor": True},
            "parameter 'prefilter_factor' of strategy 'after' must be a number >= 1, got True",
        ),
        (
            "after",
            {"prefilter_factor": 0.5},
            "parameter 'prefilter_factor' of strategy 'after' must be a number >= 1, got 0.5",
        ),
        (
            "after",
            {"uncertainty": "x"},
            "parameter 'uncertainty' of strategy 'after' must be one "
            "of ['entropy', 'margin', 'least_confidence', 'bald'], got 'x'",
        ),
    ],
)
def test_parameter_refusals(name, params, message):
    with pytest.raises(ConfigError) as err:
        get_strategy(name, **params)
    assert str(err.value) == message


def test_smallest_allowed_parameters_are_accepted():
    assert get_strategy("typiclust", knn=1, kmeans_niter=1, min_cluster_size=1).knn == 1
    assert get_strategy("cluster_margin", n_clusters=1).n_clusters == 1
    assert get_strategy("after", prefilter_factor=1).prefilter_factor == 1.0
    assert get_strategy("Cluster-Margin").name == "cluster_margin"


# The defaults documented in after_ray/al/strategies/__init__.py's table.
DOCUMENTED_DEFAULTS = {
    "random": {},
    "entropy": {},
    "least_confidence": {},
    "margin": {},
    "bald": {},
    "coreset": {"speaker_norm": None},
    "badge": {},
    "cluster_margin": {"n_clusters": None, "margin_pool_factor": 10.0, "kmeans_niter": 20},
    "typiclust": {
        "max_clusters": 500,
        "knn": 20,
        "min_cluster_size": 5,
        "kmeans_niter": 20,
        "speaker_norm": None,
    },
    "after_init": {
        "n_clusters": None,
        "max_clusters": 10,
        "kmeans_niter": 20,
        "kmeans_n_init": 5,
        "speaker_norm": None,
    },
    "alps": {"kmeans_niter": 20, "kmeans_n_init": 3, "speaker_norm": None},
    "after": {
        "uncertainty": "margin",
        "prefilter_factor": 4.0,
        "speaker_norm": None,
        "balance": False,
    },
}

# A value other than the default for each parameter, and a refused one with its message's tail.
OTHER_VALUE = {
    "n_clusters": 3,
    "margin_pool_factor": 2.5,
    "prefilter_factor": 2.5,
    "kmeans_niter": 7,
    "kmeans_n_init": 2,
    "max_clusters": 9,
    "knn": 4,
    "min_cluster_size": 0,
    "speaker_norm": False,
    "uncertainty": "entropy",
    "balance": True,
}
REFUSED = {
    "n_clusters": (0, "must be an int >= 1, got 0"),
    "margin_pool_factor": (0.9, "must be a number >= 1, got 0.9"),
    "prefilter_factor": (0.9, "must be a number >= 1, got 0.9"),
    "kmeans_niter": (0, "must be an int >= 1, got 0"),
    "kmeans_n_init": (0, "must be an int >= 1, got 0"),
    "max_clusters": (0, "must be an int >= 1, got 0"),
    "knn": (0, "must be an int >= 1, got 0"),
    "min_cluster_size": (-1, "must be an int >= 0, got -1"),
    "speaker_norm": (
        "x",
        "must be true, false or null (null: on when the pool has speaker ids), got 'x'",
    ),
    "uncertainty": (
        "x",
        "must be one of ['entropy', 'margin', 'least_confidence', 'bald'], got 'x'",
    ),
    "balance": (1, "must be true or false, got 1"),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED_DEFAULTS))
def test_defaults_params_and_refusals_of_every_parameter(name):
    from after_ray.al.strategies import strategy_params

    assert strategy_params(name) == DOCUMENTED_DEFAULTS[name]
    assert get_strategy(name).params() == DOCUMENTED_DEFAULTS[name]
    other = {p: OTHER_VALUE[p] for p in DOCUMENTED_DEFAULTS[name]}
    assert get_strategy(name, **other).params() == other
    for param in DOCUMENTED_DEFAULTS[name]:
        value, tail = REFUSED[param]
        with pytest.raises(ConfigError) as err:
            get_strategy(name, **{param: value})
        assert str(err.value) == f"parameter {param!r} of strategy {name!r} {tail}"

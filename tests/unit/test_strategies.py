"""Selection strategies: the shared contract for every registered strategy, and each strategy
against a naive brute-force reference written here (explicit loops, float64).

The references re-implement the documented rules independently (tie rules, cluster orders,
random procedures); where a strategy clusters, the reference gets the same k-means result by
calling ``after_ray.al.kernels.clustering.kmeans`` with the same arguments the strategy uses.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from after_ray.al.pool import PoolError, PoolView
from after_ray.al.strategies import STRATEGIES, get_strategy, strategy_params
from after_ray.al.strategies.base import cover_clusters, top_k
from after_ray.al.strategies.cluster_margin import (
    ClusterMarginSampling,
    default_n_clusters,
    round_robin_smallest_first,
)
from after_ray.al.strategies.cold_start import AfterInit, elbow_index, elbow_n_clusters
from after_ray.al.strategies.typiclust import TypiClustSampling
from after_ray.errors import AfterRayError, ConfigError

ALL_FIELDS = ("probs", "mc_probs", "embeddings", "penultimate", "durations")


# ---------------------------------------------------------------------------- pools


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def make_ids(n: int, rng: np.random.Generator) -> np.ndarray:
    # Ids in a shuffled (non-sorted) row order, so "ties by utt_id" differs from "by position".
    ids = np.array([f"corpus/spk{i % 7}/utt{i:04d}" for i in range(n)])
    return ids[rng.permutation(n)]


def make_pool(
    n: int = 60,
    *,
    n_labeled: int = 15,
    n_classes: int = 4,
    dim: int = 6,
    hidden: int = 5,
    mc_samples: int = 5,
    seed: int = 0,
    duplicates: bool = False,
    fields: tuple[str, ...] = ALL_FIELDS,
) -> PoolView:
    """A random pool; ``duplicates`` draws every row from a few distinct ones (exact ties)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 3, size=n) if duplicates else np.arange(n)
    m = int(rows.max()) + 1 if n else 0
    logits = rng.normal(size=(m, n_classes)) * 2.0
    mc_logits = logits[:, None, :] + rng.normal(size=(m, mc_samples, n_classes))
    labeled = np.zeros(n, dtype=bool)
    labeled[rng.choice(n, size=min(n_labeled, n), replace=False)] = True
    values = {
        "probs": softmax(logits)[rows],
        "mc_probs": softmax(mc_logits)[rows],
        "embeddings": rng.normal(size=(m, dim)).astype(np.float32)[rows],
        "penultimate": rng.normal(size=(m, hidden)).astype(np.float32)[rows],
        "durations": rng.uniform(0.5, 8.0, size=m)[rows],
    }
    return PoolView(utt_ids=make_ids(n, rng), labeled=labeled, **{f: values[f] for f in fields})


def unlabeled_ids(pool: PoolView) -> set[str]:
    return set(pool.utt_ids[~pool.labeled].tolist())


def positions_of(pool: PoolView, ids: list[str]) -> list[int]:
    where = {u: i for i, u in enumerate(pool.utt_ids.tolist())}
    return [where[u] for u in ids]


# Small k-means iteration counts keep the suite fast; the contract does not depend on them.
FAST_PARAMS = {
    "cluster_margin": {"kmeans_niter": 5},
    "typiclust": {"kmeans_niter": 5},
    "after_init": {"kmeans_niter": 5, "max_clusters": 5, "kmeans_n_init": 2},
    "alps": {"kmeans_niter": 5, "kmeans_n_init": 2},
}


def build(name: str):
    return get_strategy(name, **FAST_PARAMS.get(name, {}))


def assert_contract(pool: PoolView, name: str, batch_size: int, seed: int) -> list[str]:
    strategy = build(name)
    picked = strategy.select(pool, batch_size, seed=seed)
    assert isinstance(picked, list) and all(isinstance(u, str) for u in picked)
    assert len(picked) == min(batch_size, pool.n_unlabeled)
    assert len(set(picked)) == len(picked), "duplicate pick"
    assert set(picked) <= unlabeled_ids(pool), "picked a labeled or unknown item"
    assert strategy.select(pool, batch_size, seed=seed) == picked, "not deterministic"
    return picked


# ---------------------------------------------------------------------------- contract


STRATEGY_NAMES = sorted(STRATEGIES)


def test_registry_holds_every_strategy_in_the_brief():
    assert set(STRATEGIES) == {
        "random",
        "entropy",
        "least_confidence",
        "margin",
        "bald",
        "coreset",
        "badge",
        "cluster_margin",
        "typiclust",
        "after_init",
        "alps",
        "after",
    }
    for name, cls in STRATEGIES.items():
        assert cls.name == name
        assert set(cls.requires) <= set(ALL_FIELDS)


@pytest.mark.parametrize("name", STRATEGY_NAMES)
class TestContract:
    """The contract every registered strategy keeps (a new strategy is covered automatically)."""

    def test_batch_of_unlabeled_distinct_items_deterministic(self, name):
        pool = make_pool(seed=1)
        before = {f: getattr(pool, f).copy() for f in ALL_FIELDS}
        assert_contract(pool, name, 10, seed=3)
        for f in ALL_FIELDS:  # strategies must not write into the pool's arrays
            np.testing.assert_array_equal(getattr(pool, f), before[f])

    def test_batch_larger_than_unlabeled_returns_all_unlabeled(self, name):
        pool = make_pool(n=30, n_labeled=22, seed=2)
        picked = assert_contract(pool, name, 50, seed=0)
        assert set(picked) == unlabeled_ids(pool)

    def test_batch_zero_and_exhausted_pool_return_nothing(self, name):
        pool = make_pool(n=20, n_labeled=5, seed=3)
        assert build(name).select(pool, 0, seed=0) == []
        full = pool.with_labeled(np.ones(len(pool), dtype=bool))
        assert build(name).select(full, 5, seed=0) == []

    def test_no_labeled_items(self, name):
        assert_contract(make_pool(n=40, n_labeled=0, seed=4), name, 7, seed=1)

    def test_duplicated_rows_take_the_whole_pool_without_repeats(self, name):
        pool = make_pool(n=25, n_labeled=4, seed=5, duplicates=True)
        picked = assert_contract(pool, name, 25, seed=2)
        assert set(picked) == unlabeled_ids(pool)

    def test_missing_required_field_is_a_clear_error(self, name):
        strategy = build(name)
        for missing in sorted(strategy.requires):
            pool = make_pool(seed=6, fields=tuple(f for f in ALL_FIELDS if f != missing))
            with pytest.raises(PoolError, match=missing) as info:
                strategy.select(pool, 5, seed=0)
            assert name in str(info.value)
        # With exactly the required fields it works.
        assert_contract(make_pool(seed=6, fields=tuple(strategy.requires)), name, 5, seed=0)

    def test_score_is_none_or_one_finite_value_per_row(self, name):
        pool = make_pool(seed=11)
        scores = build(name).score(pool)
        if scores is not None:
            assert scores.shape == (len(pool),) and np.isfinite(scores).all()

    def test_bad_batch_size_or_seed_is_rejected(self, name):
        pool = make_pool(n=20, seed=7)
        for bad in (-1, 2.5, "3", True):
            with pytest.raises(PoolError, match="batch_size"):
                build(name).select(pool, bad, seed=0)
        with pytest.raises(PoolError, match="seed"):
            build(name).select(pool, 3, seed=-1)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(STRATEGY_NAMES),
    n=st.integers(1, 40),
    labeled_fraction=st.floats(0.0, 1.0),
    batch_size=st.integers(0, 45),
    seed=st.integers(0, 2**31 - 1),
    duplicates=st.booleans(),
)
def test_contract_on_random_pools(name, n, labeled_fraction, batch_size, seed, duplicates):
    pool = make_pool(
        n=n, n_labeled=int(labeled_fraction * n), seed=seed % 1000, duplicates=duplicates
    )
    picked = assert_contract(pool, name, batch_size, seed)
    if batch_size >= pool.n_unlabeled:
        assert set(picked) == unlabeled_ids(pool)


def test_random_depends_on_seed_and_not_on_row_order():
    pool = make_pool(n=200, n_labeled=50, seed=8)
    strategy = get_strategy("random")
    a = strategy.select(pool, 20, seed=0)
    assert strategy.select(pool, 20, seed=1) != a
    shuffled = pool.take(np.random.default_rng(0).permutation(len(pool)))
    assert strategy.select(shuffled, 20, seed=0) == a
    assert strategy.select(pool.sorted_by_utt_id(), 20, seed=0) == a


# ---------------------------------------------------------------------------- registry


def test_get_strategy_errors_name_the_problem():
    with pytest.raises(ConfigError, match="valid names: .*after.*typiclust"):
        get_strategy("kcenter")
    with pytest.raises(ConfigError, match="prefilter_factor"):
        get_strategy("after", prefilter=3)
    with pytest.raises(ConfigError, match="does not take"):
        get_strategy("entropy", temperature=2.0)
    with pytest.raises(ConfigError, match="uncertainty"):
        get_strategy("after", uncertainty="variance")
    with pytest.raises(ConfigError, match="prefilter_factor"):
        get_strategy("after", prefilter_factor=0.5)
    with pytest.raises(ConfigError, match="n_clusters"):
        get_strategy("after_init", n_clusters=0)
    assert type(get_strategy("Cluster-Margin")).name == "cluster_margin"
    assert strategy_params("after") == {
        "uncertainty": "margin",
        "prefilter_factor": 4.0,
        "speaker_norm": None,
        "balance": False,
    }
    for name in ("coreset", "after_init", "typiclust", "alps"):
        assert strategy_params(name)["speaker_norm"] is None  # auto: on when speakers exist
    with pytest.raises(ConfigError, match="speaker_norm"):
        get_strategy("coreset", speaker_norm="yes")
    with pytest.raises(ConfigError, match="balance"):
        get_strategy("after", balance=1)
    assert issubclass(ConfigError, AfterRayError)


def test_after_requires_follow_the_uncertainty_measure():
    assert get_strategy("after").requires == {"probs", "embeddings"}
    assert get_strategy("after", uncertainty="bald").requires == {"mc_probs", "embeddings"}
    assert "prefilter_factor=4.0" in repr(get_strategy("after"))


# ---------------------------------------------------------------------------- PoolView


def test_poolview_validation_messages():
    ids = np.array(["a", "b", "c"])
    lab = np.zeros(3, dtype=bool)
    probs = np.full((3, 2), 0.5)
    PoolView(ids, lab, probs=probs)  # valid
    cases = [
        ({"utt_ids": np.array(["a", "b", "a"])}, "duplicate"),
        ({"utt_ids": np.arange(3)}, "strings"),
        ({"labeled": np.zeros(3, dtype=int)}, "bool"),
        ({"labeled": np.zeros(4, dtype=bool)}, "shape"),
        ({"probs": np.full((3, 2), 0.6)}, "sum to 1"),
        ({"probs": np.array([[2.0, -1.0]] * 3)}, "negative"),
        ({"probs": np.full((2, 2), 0.5)}, "3 rows"),
        ({"probs": np.array([[np.nan, 1.0]] * 3)}, "non-finite"),
        ({"probs": np.ones((3, 1))}, "2 classes"),
        ({"mc_probs": np.full((3, 4, 3), 1 / 3)}, "classes"),
        ({"embeddings": np.ones((3, 2, 1))}, "2-D"),
        ({"embeddings": np.array([[1.0, np.inf]] * 3)}, "non-finite"),
        ({"durations": np.array([1.0, 0.0, 2.0])}, "> 0"),
    ]
    for change, message in cases:
        kwargs = {"utt_ids": ids, "labeled": lab, "probs": probs} | change
        with pytest.raises(PoolError, match=message):
            PoolView(**kwargs)
    assert issubclass(PoolError, AfterRayError) and issubclass(PoolError, ValueError)


def test_poolview_accessors_and_reordering():
    pool = make_pool(n=12, n_labeled=4, seed=9)
    assert len(pool) == 12 and pool.n_unlabeled == 8
    assert pool.present_fields() == set(ALL_FIELDS)
    ordered = pool.sorted_by_utt_id()
    assert list(ordered.utt_ids) == sorted(pool.utt_ids)
    back = {u: i for i, u in enumerate(pool.utt_ids)}
    for j, u in enumerate(ordered.utt_ids):
        np.testing.assert_array_equal(ordered.embeddings[j], pool.embeddings[back[u]])
        assert ordered.labeled[j] == pool.labeled[back[u]]


# ---------------------------------------------------------------------------- references


def naive_entropy(p):
    return -sum(x * math.log(x) for x in p if x > 0)


def naive_rank(pool: PoolView, score, k: int, *, smallest: bool = False) -> list[str]:
    """Explicit sort of the unlabeled items by score (highest or smallest first), then utt_id."""
    rows = [
        ((score(i) if smallest else -score(i)), str(pool.utt_ids[i]))
        for i in range(len(pool))
        if not pool.labeled[i]
    ]
    return [u for _, u in sorted(rows)[:k]]


def tied_probs_pool(seed: int, n: int = 50) -> PoolView:
    """Probabilities drawn from a handful of rows: many exact ties across items."""
    rng = np.random.default_rng(seed)
    base = softmax(rng.normal(size=(4, 3)) * 2)
    rows = rng.integers(0, 4, size=n)
    mc = softmax(rng.normal(size=(4, 6, 3)) * 2)
    labeled = rng.random(n) < 0.3
    return PoolView(make_ids(n, rng), labeled, probs=base[rows], mc_probs=mc[rows])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("tied", [False, True])
def test_uncertainty_scores_match_explicit_sort(seed, tied):
    pool = tied_probs_pool(seed) if tied else make_pool(n=80, n_labeled=20, seed=seed)
    p = pool.probs.tolist()

    def margin(i):
        top = sorted(p[i], reverse=True)
        return top[0] - top[1]

    k = 15
    assert get_strategy("entropy").select(pool, k, seed=0) == naive_rank(
        pool, lambda i: naive_entropy(p[i]), k
    )
    assert get_strategy("least_confidence").select(pool, k, seed=0) == naive_rank(
        pool, lambda i: 1.0 - max(p[i]), k
    )
    assert get_strategy("margin").select(pool, k, seed=0) == naive_rank(
        pool, margin, k, smallest=True
    )
    np.testing.assert_allclose(
        get_strategy("entropy").score(pool), [naive_entropy(r) for r in p], atol=1e-12
    )


@pytest.mark.parametrize("tied", [False, True])
def test_bald_matches_explicit_formula(tied):
    pool = tied_probs_pool(3) if tied else make_pool(n=80, n_labeled=20, seed=3, mc_samples=7)
    mc = pool.mc_probs.tolist()

    def bald(i):  # H[mean_t p_t] - mean_t H[p_t], written out
        samples = mc[i]
        t = len(samples)
        mean = [sum(s[c] for s in samples) / t for c in range(len(samples[0]))]
        return naive_entropy(mean) - sum(naive_entropy(s) for s in samples) / t

    assert get_strategy("bald").select(pool, 12, seed=0) == naive_rank(pool, bald, 12)
    np.testing.assert_allclose(
        get_strategy("bald").score(pool), [bald(i) for i in range(len(pool))], atol=1e-12
    )
    one_sample = PoolView(pool.utt_ids, pool.labeled, mc_probs=pool.mc_probs[:, :1])
    with pytest.raises(PoolError, match="at least 2"):
        get_strategy("bald").select(one_sample, 3, seed=0)


def test_score_ranking_ignores_row_order():
    pool = tied_probs_pool(5)
    shuffled = pool.take(np.random.default_rng(1).permutation(len(pool)))
    for name in ("entropy", "least_confidence", "margin", "bald"):
        assert get_strategy(name).select(shuffled, 9, seed=0) == get_strategy(name).select(
            pool, 9, seed=0
        )


def test_top_k_takes_ties_by_utt_id():
    ids = np.array(["d", "b", "a", "c", "e"])
    scores = np.array([1.0, 2.0, 1.0, 2.0, 0.5])
    positions = np.arange(5)
    assert top_k(scores, positions, ids, 3).tolist() == [1, 3, 2]
    assert top_k(scores, positions, ids, 10).tolist() == [1, 3, 2, 0, 4]


def naive_kcenter(x, labeled_positions, candidate_mask, k) -> list[int]:
    """Plain O(N k) greedy from the rule in kcenter.py: float64, ties to the lowest position."""
    x = np.asarray(x, dtype=np.float64)
    labeled_positions = list(labeled_positions)
    cand = [i for i in range(len(x)) if candidate_mask[i] and i not in labeled_positions]
    centers = list(labeled_positions)
    picks: list[int] = []

    def d2(i, j):
        return float(((x[i] - x[j]) ** 2).sum())

    if not centers and cand:
        mean = x[cand].mean(axis=0)
        first = min(cand, key=lambda i: (float(((x[i] - mean) ** 2).sum()), i))
        picks.append(first)
        centers.append(first)
    while len(picks) < min(k, len(cand)):
        rest = [i for i in cand if i not in picks]
        best = max(rest, key=lambda i: (min(d2(i, c) for c in centers), -i))
        picks.append(best)
        centers.append(best)
    return picks


@pytest.mark.parametrize("n_labeled", [0, 1, 12])
def test_coreset_matches_naive_greedy(n_labeled):
    pool = make_pool(n=70, n_labeled=n_labeled, seed=10 + n_labeled, dim=5)
    picked = get_strategy("coreset").select(pool, 12, seed=0)
    expected = naive_kcenter(pool.embeddings, pool.labeled_positions, ~pool.labeled, 12)
    assert positions_of(pool, picked) == expected


def naive_prefilter(pool: PoolView, score, m: int) -> list[int]:
    rows = sorted(
        (-score(i), str(pool.utt_ids[i]), i) for i in range(len(pool)) if not pool.labeled[i]
    )
    return [i for _, _, i in rows[:m]]


@pytest.mark.parametrize(
    ("uncertainty", "factor", "n_labeled"),
    [("entropy", 4.0, 10), ("margin", 2.5, 10), ("bald", 3.0, 0), ("least_confidence", 1.0, 5)],
)
def test_after_hybrid_matches_naive_prefilter_then_greedy(uncertainty, factor, n_labeled):
    pool = make_pool(n=90, n_labeled=n_labeled, seed=20, dim=4)
    p, mc = pool.probs.tolist(), pool.mc_probs.tolist()

    def score(i):
        if uncertainty == "entropy":
            return naive_entropy(p[i])
        if uncertainty == "least_confidence":
            return 1.0 - max(p[i])
        if uncertainty == "margin":
            top = sorted(p[i], reverse=True)
            return -(top[0] - top[1])
        t = len(mc[i])
        mean = [sum(s[c] for s in mc[i]) / t for c in range(len(p[i]))]
        return naive_entropy(mean) - sum(naive_entropy(s) for s in mc[i]) / t

    k = 8
    m = min(pool.n_unlabeled, math.ceil(factor * k))
    mask = np.zeros(len(pool), dtype=bool)
    mask[naive_prefilter(pool, score, m)] = True
    expected = naive_kcenter(pool.embeddings, pool.labeled_positions, mask, k)
    strategy = get_strategy("after", uncertainty=uncertainty, prefilter_factor=factor)
    assert positions_of(pool, strategy.select(pool, k, seed=0)) == expected
    if factor == 1.0:  # no room for diversity: exactly the top-k uncertain items, re-ordered
        top = naive_rank(pool, score, k)
        assert set(strategy.select(pool, k, seed=0)) == set(top)


def test_after_hybrid_is_more_diverse_than_top_k_on_near_duplicates():
    # Two tight groups of near-duplicates, both maximally uncertain: top-k entropy takes one
    # group whole, the hybrid takes from both.
    rng = np.random.default_rng(0)
    n = 40
    emb = np.zeros((n, 2), dtype=np.float32)
    emb[:20] = [0.0, 0.0]
    emb[20:] = [10.0, 10.0]
    emb += rng.normal(scale=0.01, size=emb.shape).astype(np.float32)
    probs = np.tile([0.9, 0.1], (n, 1))
    probs[:10] = [0.5, 0.5]
    probs[20:30] = [0.5001, 0.4999]
    ids = np.array([f"u{i:02d}" for i in range(n)])
    pool = PoolView(ids, np.zeros(n, dtype=bool), probs=probs, embeddings=emb)
    top = get_strategy("entropy").select(pool, 4, seed=0)
    hybrid = get_strategy("after", prefilter_factor=5).select(pool, 4, seed=0)
    assert {int(u[1:]) // 20 for u in top} == {0}
    assert {int(u[1:]) // 20 for u in hybrid} == {0, 1}
    assert all(int(u[1:]) % 20 < 10 for u in hybrid)  # still only the uncertain items


# ---------------------------------------------------------------------------- badge


def naive_badge(pool: PoolView, k: int, seed: int) -> list[int]:
    """Explicit gradient embeddings + k-means++ by the seeding rule in badge_fast.py."""
    cand = [i for i in range(len(pool)) if not pool.labeled[i]]
    g = {}
    for i in cand:
        p = pool.probs[i].astype(np.float64)
        residual = p.copy()
        residual[int(np.argmax(p))] -= 1.0  # first maximum
        g[i] = np.outer(residual, pool.penultimate[i].astype(np.float64)).ravel()

    def d2(i, centers):
        return min(float(((g[i] - g[c]) ** 2).sum()) for c in centers)

    # 1. the largest gradient norm first (ties: lowest position)
    first = max(cand, key=lambda i: (float((g[i] ** 2).sum()), -i))
    picks = [first]
    rng = np.random.default_rng(seed)
    while len(picks) < min(k, len(cand)):
        # 2-3. one uniform per candidate (picked or not, in position order); the pick is the
        # smallest -log(u) / D2 among candidates with D2 > 0 (an exponential race = D2 sampling).
        u = rng.random(len(cand))
        keys = []
        for j, i in enumerate(cand):
            dist = d2(i, picks)
            ok = i not in picks and dist > 0 and u[j] > 0
            keys.append((-math.log(u[j]) / dist if ok else math.inf, i))
        best_key, best = min(keys)
        if math.isinf(best_key):
            best = min(i for i in cand if i not in picks)
        picks.append(best)
    return picks


@pytest.mark.parametrize(("n_labeled", "seed"), [(0, 0), (10, 1), (25, 7)])
def test_badge_matches_explicit_gradient_embedding_kmeanspp(n_labeled, seed):
    pool = make_pool(n=60, n_labeled=n_labeled, seed=60 + seed, n_classes=3, hidden=4)
    picked = get_strategy("badge").select(pool, 10, seed=seed)
    assert positions_of(pool, picked) == naive_badge(pool, 10, seed)
    assert get_strategy("badge").select(pool, 10, seed=seed + 1) != picked  # the seed matters


def test_badge_first_pick_is_the_largest_gradient():
    # A confident item has a near-zero gradient embedding; the most uncertain one with the
    # largest features comes first.
    probs = np.array([[0.98, 0.01, 0.01], [0.4, 0.35, 0.25], [0.34, 0.33, 0.33]])
    pen = np.array([[5.0, 5.0], [3.0, 3.0], [1.0, 1.0]])
    pool = PoolView(np.array(["a", "b", "c"]), np.zeros(3, bool), probs=probs, penultimate=pen)
    assert get_strategy("badge").select(pool, 1, seed=0) == ["b"]


# ---------------------------------------------------------------------------- cluster margin


def naive_cluster_margin(pool: PoolView, assignment, k: int, factor: float, seed: int) -> list[str]:
    p = pool.probs.tolist()
    unl = [i for i in range(len(pool)) if not pool.labeled[i]]

    def margin(i):
        top = sorted(p[i], reverse=True)
        return top[0] - top[1]

    k_m = min(len(unl), math.ceil(factor * k))
    cand = sorted(unl, key=lambda i: (margin(i), str(pool.utt_ids[i])))[:k_m]
    groups: dict[int, list[int]] = {}
    for i in cand:
        groups.setdefault(int(assignment[i]), []).append(i)
    order = sorted(groups, key=lambda c: (len(groups[c]), c))
    rng = np.random.default_rng(seed)
    queues = []
    for c in order:
        members = sorted(groups[c], key=lambda i: str(pool.utt_ids[i]))
        queues.append([members[j] for j in rng.permutation(len(members))])
    picks: list[int] = []
    rnd = 0
    while len(picks) < k:
        for q in queues:
            if rnd < len(q) and len(picks) < k:
                picks.append(q[rnd])
        rnd += 1
    return [str(pool.utt_ids[i]) for i in picks]


@pytest.mark.parametrize(("n_clusters", "factor", "seed"), [(None, 10.0, 0), (6, 3.0, 1)])
def test_cluster_margin_matches_naive_given_the_same_clustering(n_clusters, factor, seed):
    from after_ray.al.kernels.clustering import kmeans

    pool = make_pool(n=120, n_labeled=30, seed=30 + seed, dim=4)
    strategy = ClusterMarginSampling(n_clusters=n_clusters, margin_pool_factor=factor)
    k = 9
    expected_k = n_clusters or default_n_clusters(len(pool))
    _, assignment = kmeans(pool.embeddings, expected_k, seed=seed, niter=strategy.kmeans_niter)
    np.testing.assert_array_equal(strategy.cluster(pool, seed), assignment)
    assert strategy.select(pool, k, seed=seed) == naive_cluster_margin(
        pool, np.asarray(assignment), k, factor, seed
    )


def test_round_robin_visits_smallest_clusters_first():
    ids = np.array([f"u{i}" for i in range(9)])
    # cluster 7: 1 candidate, cluster 3: 3 candidates, cluster 5: 5 candidates.
    assignment = np.array([5, 3, 5, 7, 5, 3, 5, 3, 5])
    picks = round_robin_smallest_first(np.arange(9), assignment, ids, 9, seed=0)
    clusters = assignment[picks].tolist()
    assert clusters == [7, 3, 5, 3, 5, 3, 5, 5, 5]
    assert sorted(picks.tolist()) == list(range(9))


# ---------------------------------------------------------------------------- typiclust


def naive_typiclust(pool: PoolView, assignment, k: int, knn: int, min_size: int) -> list[int]:
    x = pool.embeddings.astype(np.float64)
    assignment = [int(a) for a in assignment]
    clusters = sorted(set(assignment))
    members = {c: [i for i in range(len(pool)) if assignment[i] == c] for c in clusters}
    covered = {c: sum(bool(pool.labeled[i]) for i in members[c]) for c in clusters}

    def typical_order(c):
        mem = members[c]
        nn = 0 if len(mem) < 2 else max(1, min(knn, len(mem) // 2))
        spread = {}
        for i in mem:
            d = sorted(float(np.sqrt(((x[i] - x[j]) ** 2).sum())) for j in mem if j != i)
            spread[i] = sum(d[:nn]) / nn if nn else math.inf
        unl = [i for i in mem if not pool.labeled[i]]
        return sorted(unl, key=lambda i: (spread[i], str(pool.utt_ids[i])))

    queues = {c: typical_order(c) for c in clusters}
    picks: list[int] = []
    while len(picks) < k:
        live = [c for c in clusters if queues[c]]
        if not live:
            break
        c = min(live, key=lambda c: (len(members[c]) < min_size, covered[c], -len(members[c]), c))
        picks.append(queues[c].pop(0))
        covered[c] += 1
    return picks


@pytest.mark.parametrize(("n_labeled", "k", "knn", "min_size"), [(0, 10, 20, 5), (8, 14, 3, 2)])
def test_typiclust_matches_naive_given_the_same_clustering(n_labeled, k, knn, min_size):
    from after_ray.al.kernels.clustering import kmeans

    pool = make_pool(n=90, n_labeled=n_labeled, seed=40, dim=3)
    strategy = TypiClustSampling(knn=knn, min_cluster_size=min_size)
    _, assignment = kmeans(
        pool.embeddings, min(500, n_labeled + k, 90), seed=2, niter=strategy.kmeans_niter
    )
    expected = naive_typiclust(pool, assignment, k, knn, min_size)
    assert positions_of(pool, strategy.select(pool, k, seed=2)) == expected
    # And on a hand-made clustering with a tiny outlier cluster and a covered cluster.
    handmade = np.arange(90) % 4
    handmade[:2] = 4  # cluster 4 has 2 members: below min_size, last in line
    assert strategy.select_with_clusters(pool, handmade, k).tolist() == naive_typiclust(
        pool, handmade, k, knn, min_size
    )


def test_typiclust_picks_the_dense_core_of_a_blob():
    rng = np.random.default_rng(1)
    core = rng.normal(scale=0.05, size=(30, 2))
    halo = rng.normal(scale=2.0, size=(10, 2)) + 4.0
    emb = np.vstack([core, halo]).astype(np.float32)
    ids = np.array([f"u{i:02d}" for i in range(40)])
    pool = PoolView(ids, np.zeros(40, dtype=bool), embeddings=emb)
    picked = TypiClustSampling().select(pool, 1, seed=0)
    assert int(picked[0][1:]) < 30


# ---------------------------------------------------------------------------- after_init


def naive_after_init(x, centroids, assignment, pool: PoolView, k: int) -> list[int]:
    x = np.asarray(x, dtype=np.float64)
    clusters = sorted(set(int(a) for a in assignment))
    members = {c: [i for i in range(len(pool)) if assignment[i] == c] for c in clusters}
    covered = {c: sum(bool(pool.labeled[i]) for i in members[c]) for c in clusters}
    queues = {
        c: sorted(
            (i for i in members[c] if not pool.labeled[i]),
            key=lambda i, c=c: (
                float(((x[i] - np.asarray(centroids[c], dtype=np.float64)) ** 2).sum()),
                str(pool.utt_ids[i]),
            ),
        )
        for c in clusters
    }
    picks: list[int] = []
    while len(picks) < k and any(queues.values()):
        c = min((c for c in clusters if queues[c]), key=lambda c: (covered[c], -len(members[c]), c))
        picks.append(queues[c].pop(0))
        covered[c] += 1
    return picks


@pytest.mark.parametrize(("n_clusters", "n_labeled"), [(4, 0), (5, 6), (None, 0)])
def test_after_init_matches_naive_given_the_same_clustering(n_clusters, n_labeled):
    pool = make_pool(n=80, n_labeled=n_labeled, seed=50, dim=4)
    strategy = AfterInit(n_clusters=n_clusters, max_clusters=6)
    x, centroids, assignment = strategy.cluster(pool, seed=4)
    norms = np.linalg.norm(x, axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)  # clustered on normalised embeddings
    if n_clusters is not None:  # the best (lowest inertia) of n_init seeded runs, first on ties
        from after_ray.al.kernels.clustering import kmeans

        n_init = strategy.kmeans_n_init
        runs = [
            kmeans(x, n_clusters, seed=4 * n_init + i, niter=strategy.kmeans_niter)
            for i in range(n_init)
        ]
        x64 = x.astype(np.float64)
        inertia = [float(((x64 - np.asarray(c, dtype=np.float64)[a]) ** 2).sum()) for c, a in runs]
        np.testing.assert_array_equal(assignment, runs[int(np.argmin(inertia))][1])
    picked = strategy.select(pool, 17, seed=4)
    assert positions_of(pool, picked) == naive_after_init(x, centroids, assignment, pool, 17)


def test_elbow_rule():
    assert elbow_index(np.array([100.0, 20.0, 15.0, 12.0, 10.0])) == 1  # K = 2
    assert elbow_index(np.array([100.0, 90.0, 80.0, 20.0, 18.0, 17.0])) == 3  # K = 4
    assert elbow_index(np.array([100.0, 75.0, 50.0, 25.0])) == 3  # straight line: K_max
    assert elbow_index(np.array([100.0, 99.0, 60.0, 0.0])) == 3  # concave: K_max
    assert elbow_index(np.array([5.0])) == 0


def test_after_init_finds_the_blobs_and_covers_each_one():
    rng = np.random.default_rng(2)
    centers = np.eye(4, 8) * 10.0
    blob = np.repeat(np.arange(4), [40, 30, 20, 10])
    emb = (centers[blob] + rng.normal(scale=0.3, size=(100, 8))).astype(np.float32)
    ids = make_ids(100, rng)
    pool = PoolView(ids, np.zeros(100, dtype=bool), embeddings=emb)
    n_clusters, inertias, _ = elbow_n_clusters(
        np.asarray(emb / np.linalg.norm(emb, axis=1, keepdims=True)), 8, seed=0, n_init=5
    )
    assert n_clusters == 4 and len(inertias) == 8
    picked = AfterInit().select(pool, 8, seed=0)
    blobs = blob[positions_of(pool, picked)].tolist()
    assert blobs[:4] == [0, 1, 2, 3]  # round-robin, largest cluster first
    assert blobs[4:] == [0, 1, 2, 3]


def test_cover_clusters_round_robin_and_labeled_coverage():
    assignment = np.array([0, 0, 0, 1, 1, 2])
    labeled = np.array([False, False, False, True, False, False])

    def by_position(cluster, members):
        return members

    # Cluster 1 already has a labeled member: clusters 0 (larger) and 2 come first.
    picks = cover_clusters(assignment, labeled, 5, by_position)
    assert picks.tolist() == [0, 5, 1, 4, 2]


# ---------------------------------------------------------------------------- speaker_norm


def naive_speaker_standardize(x, speakers) -> np.ndarray:
    """Per speaker and dimension, explicit loops: (x - mean) / max(std, 1e-6); one row: x - mean."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    for spk in sorted(set(speakers)):
        rows = [i for i, s in enumerate(speakers) if s == spk]
        for j in range(x.shape[1]):
            values = [x[i, j] for i in rows]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
            for i in rows:
                out[i, j] = x[i, j] - mean
                if len(rows) > 1:
                    out[i, j] /= max(std, 1e-6)
    return out


def test_speaker_standardize_matches_hand_computation(monkeypatch):
    from after_ray.al.strategies import base

    x = np.array(
        [
            [1.0, 10.0, 5.0],
            [3.0, 14.0, 5.0],  # column 2 is constant for speaker a: centred to 0, not / 0
            [100.0, -2.0, 7.0],
            [5.0, 12.0, 5.0],
            [104.0, 2.0, 1.0],
            [7.0, 7.0, 7.0],  # speaker c has one row: centred only (the zero vector)
            [0.0, 1.0, 2.0],
            [2.0, 3.0, 6.0],  # "" = unknown speaker: one group of their own
        ],
        dtype=np.float32,
    )
    speakers = np.array(["a", "a", "b", "a", "b", "c", "", ""])
    z = base.speaker_standardize(x, speakers)
    assert z.dtype == np.float32 and z.shape == x.shape
    # By hand for speaker a, column 0: values 1, 3, 5 -> mean 3, population std sqrt(8/3).
    np.testing.assert_allclose(z[[0, 1, 3], 0], np.array([-2.0, 0.0, 2.0]) / math.sqrt(8 / 3))
    # Speaker b, column 1: -2, 2 -> mean 0, std 2 -> -1, 1.
    np.testing.assert_allclose(z[[2, 4], 1], [-1.0, 1.0])
    np.testing.assert_array_equal(z[[0, 1, 3], 2], 0.0)
    np.testing.assert_array_equal(z[5], 0.0)
    np.testing.assert_allclose(z, naive_speaker_standardize(x, speakers.tolist()), atol=1e-6)
    for rows in ([0, 1, 3], [2, 4], [6, 7]):  # mean 0 and std 1 in every varying dimension
        np.testing.assert_allclose(z[rows].mean(axis=0), 0.0, atol=1e-6)
        std = z[rows].std(axis=0)
        np.testing.assert_allclose(std[std > 0], 1.0, rtol=1e-6)
    # Column blocks (the memory bound) give the same values; re-applying changes nothing.
    monkeypatch.setattr(base, "_SPEAKER_BLOCK_ELEMENTS", 8)
    np.testing.assert_array_equal(base.speaker_standardize(x, speakers), z)
    np.testing.assert_allclose(base.speaker_standardize(z, speakers), z, atol=1e-6)
    # A per-dimension affine re-scaling of the pool does not change the result.
    np.testing.assert_allclose(
        base.speaker_standardize(x * np.float32([2.0, 0.5, 3.0]) + 7.0, speakers), z, atol=1e-5
    )


def speaker_dominated_pool(seed: int = 5) -> tuple[PoolView, np.ndarray]:
    """8 speakers x 16 utterances (8 neutral, 4 happy, 2 angry, 2 sad): a speaker offset of
    scale 10 on every dimension, a class signal of scale 1 and noise of 0.2, as in SER features
    where the voice is the largest source of variance."""
    rng = np.random.default_rng(seed)
    per_speaker = np.repeat(np.arange(4), [8, 4, 2, 2])
    speaker = np.repeat(np.arange(8), per_speaker.shape[0])
    classes = np.tile(per_speaker, 8)
    offsets = rng.normal(scale=10.0, size=(8, 6))
    means = rng.normal(scale=1.0, size=(4, 6))
    emb = offsets[speaker] + means[classes] + rng.normal(scale=0.2, size=(speaker.shape[0], 6))
    ids = np.array([f"u{i:03d}" for i in range(speaker.shape[0])])
    pool = PoolView(
        ids,
        np.zeros(ids.shape[0], dtype=bool),
        embeddings=emb.astype(np.float32),
        speakers=np.array([f"spk{s}" for s in speaker]),
    )
    return pool, classes


def class_counts(picked: list[str], classes: np.ndarray) -> list[int]:
    return np.bincount(classes[[int(u[1:]) for u in picked]], minlength=4).tolist()


def test_coreset_with_speaker_norm_covers_the_classes_not_the_voices():
    pool, classes = speaker_dominated_pool()
    raw = get_strategy("coreset", speaker_norm=False).select(pool, 8, seed=0)
    normed = get_strategy("coreset", speaker_norm=True).select(pool, 8, seed=0)
    assert class_counts(raw, classes) == [4, 3, 1, 0]  # voices covered: sad is never asked
    assert class_counts(normed, classes) == [2, 2, 2, 2]
    # Auto (the default) normalises when the pool has speakers, and it is what coreset measures.
    assert get_strategy("coreset").select(pool, 8, seed=0) == normed
    z = naive_speaker_standardize(pool.embeddings, pool.speakers.tolist())
    expected = naive_kcenter(z, np.empty(0, dtype=np.int64), np.ones(len(pool), dtype=bool), 8)
    assert positions_of(pool, normed) == expected
    # Without speaker ids (or with all-distinct ids) auto falls back to the raw embeddings.
    bare = PoolView(pool.utt_ids, pool.labeled, embeddings=pool.embeddings)
    assert get_strategy("coreset").select(bare, 8, seed=0) == raw
    distinct = PoolView(
        pool.utt_ids, pool.labeled, embeddings=pool.embeddings, speakers=pool.utt_ids
    )
    assert get_strategy("coreset").select(distinct, 8, seed=0) == raw


def test_speaker_norm_reaches_the_hybrid_and_the_cold_starts():
    pool, _ = speaker_dominated_pool()
    z = naive_speaker_standardize(pool.embeddings, pool.speakers.tolist()).astype(np.float32)
    as_normed = PoolView(pool.utt_ids, pool.labeled, embeddings=z)
    for name, params in [
        ("after_init", {"n_clusters": 4, "kmeans_niter": 5}),
        ("typiclust", {"kmeans_niter": 5}),
        ("alps", {"kmeans_niter": 5}),
    ]:
        normed = get_strategy(name, **params).select(pool, 6, seed=1)
        assert normed == get_strategy(name, speaker_norm=False, **params).select(
            as_normed, 6, seed=1
        ), name
    rng = np.random.default_rng(3)
    probs = softmax(rng.normal(size=(len(pool), 4)))
    scored = PoolView(
        pool.utt_ids, pool.labeled, probs=probs, embeddings=pool.embeddings, speakers=pool.speakers
    )
    scored_normed = PoolView(pool.utt_ids, pool.labeled, probs=probs, embeddings=z)
    assert get_strategy("after").select(scored, 6, seed=0) == get_strategy(
        "after", speaker_norm=False
    ).select(scored_normed, 6, seed=0)


@pytest.mark.parametrize("name", ["coreset", "after", "after_init", "typiclust", "alps"])
def test_speaker_norm_true_without_speakers_is_a_clear_error(name):
    pool = make_pool(n=30, n_labeled=5, seed=12)  # no speakers
    with pytest.raises(PoolError, match="speaker_norm=true.*no speaker ids") as info:
        get_strategy(name, speaker_norm=True).select(pool, 4, seed=0)
    assert name in str(info.value)
    with_speakers = PoolView(
        pool.utt_ids,
        pool.labeled,
        probs=pool.probs,
        embeddings=pool.embeddings,
        speakers=np.array([f"s{i % 3}" for i in range(len(pool))]),
    )
    assert len(get_strategy(name, speaker_norm=True).select(with_speakers, 4, seed=0)) == 4


def test_poolview_speakers_validation_and_take():
    ids = np.array(["a", "b", "c"])
    lab = np.zeros(3, dtype=bool)
    pool = PoolView(ids, lab, speakers=np.array(["s1", None, "s2"], dtype=object))
    assert pool.speakers.tolist() == ["s1", "", "s2"]  # None = unknown
    assert "speakers" in pool.present_fields()
    assert pool.take(np.array([2, 0])).speakers.tolist() == ["s2", "s1"]
    with pytest.raises(PoolError, match="speakers must have shape"):
        PoolView(ids, lab, speakers=np.array(["s1", "s2"]))
    with pytest.raises(PoolError, match="strings"):
        PoolView(ids, lab, speakers=np.arange(3))


def test_runner_pool_view_carries_the_manifest_speakers():
    from after_ray.pipeline.runner import _pool_view

    ids = ["u1", "u2", "u3"]
    view = _pool_view(ids, {"u2"}, None, None, {"u1": "ses1/F", "u2": "ses1/M", "u3": None})
    assert view.speakers.tolist() == ["ses1/F", "ses1/M", ""]
    assert view.labeled.tolist() == [False, True, False]
    assert _pool_view(ids, set(), None, None, {"u1": "", "u2": None}).speakers is None
    assert _pool_view(ids, set()).speakers is None


# ---------------------------------------------------------------------------- after: margin, balance


def test_after_default_prefilter_is_the_brute_force_margin_ranking():
    pool = make_pool(n=120, n_labeled=20, seed=21, dim=5)
    strategy = get_strategy("after")
    assert strategy.uncertainty == "margin" and strategy.prefilter_factor == 4.0
    p = pool.probs.tolist()

    def neg_margin(i):
        top = sorted(p[i], reverse=True)
        return -(top[0] - top[1])

    k = 7
    expected_candidates = naive_prefilter(pool, neg_margin, 4 * k)
    assert strategy.candidates(pool, k).tolist() == expected_candidates
    mask = np.zeros(len(pool), dtype=bool)
    mask[expected_candidates] = True
    expected = naive_kcenter(pool.embeddings, pool.labeled_positions, mask, k)
    assert positions_of(pool, strategy.select(pool, k, seed=0)) == expected
    # entropy stays selectable and ranks differently on this pool.
    entropy_first = get_strategy("after", uncertainty="entropy").candidates(pool, k)
    assert set(entropy_first.tolist()) != set(expected_candidates)


def naive_balanced(pool: PoolView, mask: np.ndarray, k: int) -> list[int]:
    """Greedy order over all candidates, then the class with the fewest picks takes its next
    item (ties: fewer labeled items predicted in it, then the lower class)."""
    order = naive_kcenter(pool.embeddings, pool.labeled_positions, mask, int(mask.sum()))
    predicted = [int(np.argmax(row)) for row in pool.probs]
    queues: dict[int, list[int]] = {}
    for i in order:
        queues.setdefault(predicted[i], []).append(i)
    labeled_per_class = {
        c: sum(1 for i in pool.labeled_positions if predicted[i] == c) for c in queues
    }
    counts = dict.fromkeys(queues, 0)
    picks: list[int] = []
    while len(picks) < k and any(queues.values()):
        c = min(
            (c for c in queues if queues[c]), key=lambda c: (counts[c], labeled_per_class[c], c)
        )
        picks.append(queues[c].pop(0))
        counts[c] += 1
    return picks


def balanced_pool(n_per_class=(30, 15, 10, 2), n_labeled: int = 0) -> PoolView:
    rng = np.random.default_rng(4)
    predicted = np.repeat(np.arange(4), n_per_class)
    n = predicted.shape[0]
    logits = rng.normal(scale=0.1, size=(n, 4))
    logits[np.arange(n), predicted] += 0.5  # all uncertain, argmax = the predicted class
    labeled = np.zeros(n, dtype=bool)
    labeled[rng.choice(n, size=n_labeled, replace=False)] = True
    return PoolView(
        np.array([f"u{i:03d}" for i in range(n)]),
        labeled,
        probs=softmax(logits),
        embeddings=rng.normal(size=(n, 3)).astype(np.float32),
    )


@pytest.mark.parametrize(("k", "n_labeled"), [(8, 0), (10, 0), (9, 6)])
def test_after_balance_gives_class_counts_within_one(k, n_labeled):
    pool = balanced_pool(n_labeled=n_labeled)
    predicted = np.argmax(pool.probs, axis=1)
    strategy = get_strategy("after", balance=True, prefilter_factor=20)
    picked = strategy.select(pool, k, seed=0)
    counts = np.bincount(predicted[positions_of(pool, picked)], minlength=4)
    available = np.bincount(predicted[~pool.labeled], minlength=4)
    # Within one of the largest count, unless the class has no candidate left.
    assert all(counts[c] >= counts.max() - 1 or counts[c] == available[c] for c in range(4))
    mask = np.zeros(len(pool), dtype=bool)
    mask[strategy.candidates(pool, k)] = True
    assert positions_of(pool, picked) == naive_balanced(pool, mask, k)
    if (k, n_labeled) == (8, 0):
        assert counts.tolist() == [2, 2, 2, 2]
        unbalanced = get_strategy("after", prefilter_factor=20).select(pool, 8, seed=0)
        plain = np.bincount(predicted[positions_of(pool, unbalanced)], minlength=4)
        assert plain.tolist() != [2, 2, 2, 2]  # balance is what evens the counts out
    if (k, n_labeled) == (10, 0):  # class 3 has 2 items: the others share the rest evenly
        assert counts.tolist() == [3, 3, 2, 2]


# ---------------------------------------------------------------------------- alps


def naive_alps(pool: PoolView, k: int, seed: int, niter: int, n_init: int) -> list[int]:
    """k-means of the normalised unlabeled rows into k clusters (the same seeded runs as the
    strategy, the lowest inertia kept), then each cluster's member nearest to its centroid,
    largest cluster first."""
    from after_ray.al.kernels.clustering import kmeans

    x = pool.embeddings.astype(np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    unl = [i for i in range(len(pool)) if not pool.labeled[i]]
    xu = x[unl].astype(np.float32)
    runs = [kmeans(xu, k, seed=seed * n_init + i, niter=niter) for i in range(n_init)]
    inertia = [
        float(((xu.astype(np.float64) - np.asarray(c, np.float64)[a]) ** 2).sum()) for c, a in runs
    ]
    centroids, assignment = runs[int(np.argmin(inertia))]
    members: dict[int, list[int]] = {}
    for j, c in enumerate(np.asarray(assignment).tolist()):
        members.setdefault(c, []).append(unl[j])

    def d2(i, c):
        diff = x[i].astype(np.float32).astype(np.float64) - np.asarray(centroids[c], np.float64)
        return float((diff**2).sum())

    queues = {
        c: sorted(m, key=lambda i, c=c: (d2(i, c), str(pool.utt_ids[i])))
        for c, m in members.items()
    }
    order = sorted(queues, key=lambda c: (-len(queues[c]), c))
    picks: list[int] = []
    depth = 0
    while len(picks) < k:
        for c in order:
            if depth < len(queues[c]) and len(picks) < k:
                picks.append(queues[c][depth])
        depth += 1
    return picks


@pytest.mark.parametrize(("n_labeled", "k", "seed"), [(0, 5, 0), (7, 6, 3)])
def test_alps_is_nearest_to_centroid_without_labels(n_labeled, k, seed):
    rng = np.random.default_rng(seed)
    n = 40
    emb = (np.eye(5, 4)[rng.integers(0, 5, size=n)] * 3 + rng.normal(size=(n, 4))).astype(
        np.float32
    )
    labeled = np.zeros(n, dtype=bool)
    labeled[rng.choice(n, size=n_labeled, replace=False)] = True
    ids = make_ids(n, rng)
    # Only ids, the labeled mask and embeddings: no label, no model output anywhere.
    pool = PoolView(ids, labeled, embeddings=emb)
    strategy = get_strategy("alps", kmeans_niter=10)
    picked = strategy.select(pool, k, seed=seed)
    assert positions_of(pool, picked) == naive_alps(pool, k, seed, 10, strategy.kmeans_n_init)
    assert strategy.select(pool, k, seed=seed) == picked  # deterministic for a seed
    # Model outputs, if present, change nothing: alps reads the embeddings only.
    probs = softmax(rng.normal(size=(n, 4)))
    with_outputs = PoolView(ids, labeled, probs=probs, mc_probs=probs[:, None, :], embeddings=emb)
    assert strategy.select(with_outputs, k, seed=seed) == picked


def test_alps_covers_the_blobs_of_a_cold_start():
    rng = np.random.default_rng(2)
    centers = np.eye(4, 8) * 10.0
    blob = np.repeat(np.arange(4), [40, 30, 20, 10])
    emb = (centers[blob] + rng.normal(scale=0.3, size=(100, 8))).astype(np.float32)
    pool = PoolView(make_ids(100, rng), np.zeros(100, dtype=bool), embeddings=emb)
    picked = get_strategy("alps").select(pool, 4, seed=0)
    assert sorted(blob[positions_of(pool, picked)].tolist()) == [0, 1, 2, 3]


def test_default_cold_start_is_random():
    from after_ray.config.sections import ALConfig

    assert ALConfig().cold_start == "random"
    assert ALConfig().strategy == "after"


# ---------------------------------------------------------------------------- helpers, by value


def test_after_balance_stays_inside_the_prefilter():
    pool = balanced_pool(n_labeled=6)
    strategy = get_strategy("after", balance=True, prefilter_factor=2)
    candidates = strategy.candidates(pool, 6)
    assert len(candidates) == 12 < pool.n_unlabeled
    picked = positions_of(pool, strategy.select(pool, 6, seed=0))
    mask = np.zeros(len(pool), dtype=bool)
    mask[candidates] = True
    assert set(picked) <= set(candidates.tolist())
    assert picked == naive_balanced(pool, mask, 6)


def test_after_bald_balance_predicts_from_the_mean_of_the_samples():
    from after_ray.al.strategies.hybrid import AfterHybrid

    pool = make_pool(n=30, seed=12, fields=("mc_probs", "embeddings"))
    strategy = AfterHybrid(uncertainty="bald", balance=True)
    np.testing.assert_array_equal(
        strategy.predicted_classes(pool), np.argmax(pool.mc_probs.mean(axis=1), axis=1)
    )
    assert len(strategy.select(pool, 5, seed=0)) == 5  # no probs needed anywhere


def test_hybrid_uncertainty_scores_and_prefilter_size_by_hand():
    from after_ray.al.strategies.hybrid import prefilter_size, uncertainty_scores

    assert prefilter_size(5, 100, 1.3) == 7  # ceil(6.5)
    assert prefilter_size(30, 100, 1.1) == 33  # 33.000000000000004 is 33
    assert prefilter_size(5, 100, 1.0) == 5 and prefilter_size(5, 12, 4.0) == 12
    two = make_pool(n=10, mc_samples=2, seed=13, fields=("mc_probs",))
    np.testing.assert_array_equal(uncertainty_scores(two, "bald"), get_strategy("bald").score(two))
    one = make_pool(n=10, mc_samples=1, n_classes=3, seed=13, fields=("mc_probs",))
    with pytest.raises(PoolError) as err:
        uncertainty_scores(one, "bald")
    assert str(err.value) == (
        "uncertainty 'bald' needs at least 2 Monte-Carlo dropout samples per item, the pool "
        "has 1; set al.mc_dropout_samples >= 2"
    )
    with pytest.raises(ValueError) as err:
        uncertainty_scores(two, "variance")
    assert str(err.value) == "unknown uncertainty measure 'variance'"


def test_cluster_margin_uses_its_own_iteration_count_and_sqrt_n_clusters():
    from after_ray.al.kernels.clustering import kmeans

    assert [default_n_clusters(n) for n in (1, 2, 4, 5, 100)] == [1, 2, 2, 3, 10]
    u = np.random.default_rng(14).random((3000, 2)).astype(np.float32)
    pool = PoolView(
        utt_ids=np.array([f"u{i:04d}" for i in range(3000)]),
        labeled=np.zeros(3000, dtype=bool),
        embeddings=u,
    )
    one = kmeans(u, 55, seed=3, niter=1)[1]  # ceil(sqrt(3000)) clusters
    assert not np.array_equal(one, kmeans(u, 55, seed=3, niter=20)[1])
    np.testing.assert_array_equal(ClusterMarginSampling(kmeans_niter=1).cluster(pool, seed=3), one)


def test_typiclust_helpers_by_value():
    from after_ray.al.strategies.typiclust import mean_knn_distance, typiclust_neighbors

    assert [typiclust_neighbors(s, 20) for s in (0, 1, 2, 3, 4, 10, 100)] == [0, 0, 1, 1, 2, 5, 20]
    assert typiclust_neighbors(10, 3) == 3
    base_rows = np.random.default_rng(0).standard_normal((30, 5)) * 3 + 10
    x = np.concatenate([base_rows, base_rows])  # duplicates: neighbours at distance 0
    # |a|^2 + |b|^2 - 2 a.b rounds below 0 for some twins here: clamped, never a NaN.
    sq = np.einsum("ij,ij->i", x, x)
    raw = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.fill_diagonal(raw, 1.0)
    assert (raw < 0).any()
    brute = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.fill_diagonal(brute, np.inf)
    for n_neighbors in (1, 2, 5):
        want = np.sort(brute, axis=1)[:, :n_neighbors].mean(axis=1)
        got = mean_knn_distance(x, n_neighbors)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-6)
    # (within the formula's rounding: ~sqrt(|x|^2 * 1e-16), not exactly 0)
    np.testing.assert_allclose(mean_knn_distance(x, 1), 0.0, atol=1e-6)
    assert np.isinf(mean_knn_distance(x, 0)).all() and mean_knn_distance(x, 0).shape == (60,)
    # Many neighbours in a large cluster (numpy's partition only guarantees the k-th element).
    big = np.random.default_rng(15).random((1000, 2))
    d = np.sqrt(((big[:, None] - big[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(
        mean_knn_distance(big, 100), np.sort(d, axis=1)[:, :100].mean(axis=1), rtol=1e-9
    )


def test_mean_knn_distance_over_several_chunks():
    # 2100 rows: the distance matrix is computed in two row chunks (4M values each).
    from after_ray.al.strategies.typiclust import mean_knn_distance

    x = np.random.default_rng(16).standard_normal((2100, 3))
    got = mean_knn_distance(x, 3)
    for i in (0, 1999, 2099):
        d = np.sqrt(((x - x[i]) ** 2).sum(1))
        d[i] = np.inf
        assert got[i] == pytest.approx(np.sort(d)[:3].mean(), rel=1e-9)


def test_typiclust_cluster_count_iterations_and_embeddings():
    from after_ray.al.kernels.clustering import kmeans
    from after_ray.al.strategies.base import speaker_standardize

    pool = make_pool(n=40, n_labeled=10, seed=17)
    assert TypiClustSampling().n_clusters(pool, 5) == 15  # labeled + k
    assert TypiClustSampling(max_clusters=4).n_clusters(pool, 5) == 4
    one = make_pool(n=1, n_labeled=0, seed=17)
    assert TypiClustSampling().n_clusters(one, 1) == 1
    got = TypiClustSampling(kmeans_niter=1).cluster(pool, 5, seed=2)
    np.testing.assert_array_equal(got, kmeans(pool.embeddings, 15, seed=2, niter=1)[1])
    # Without x, cluster() and select_with_clusters() measure the (speaker-normalised)
    # embeddings themselves, as _select does.
    speakers = np.array([f"s{i % 3}" for i in range(40)])
    spk_pool = PoolView(
        utt_ids=pool.utt_ids, labeled=pool.labeled, embeddings=pool.embeddings, speakers=speakers
    )
    z = speaker_standardize(pool.embeddings, speakers)
    for norm, x in ((None, z), (False, pool.embeddings)):
        strategy = TypiClustSampling(kmeans_niter=3, speaker_norm=norm)
        a = strategy.cluster(spk_pool, 5, seed=4)
        np.testing.assert_array_equal(a, strategy.cluster(spk_pool, 5, seed=4, x=x))
        np.testing.assert_array_equal(
            strategy.select_with_clusters(spk_pool, a, 5),
            strategy.select_with_clusters(spk_pool, a, 5, x=x),
        )
    strict = TypiClustSampling(speaker_norm=True)
    for call in (
        lambda: strict.cluster(pool, 5, seed=0),
        lambda: strict.select_with_clusters(pool, np.zeros(40, dtype=np.int64), 5),
    ):
        with pytest.raises(PoolError, match="^strategy 'typiclust' has speaker_norm=true"):
            call()


def test_alps_uses_its_own_iteration_count():
    from after_ray.al.strategies.alps import ALPSSampling
    from after_ray.al.strategies.base import l2_normalize
    from after_ray.al.strategies.cold_start import best_kmeans

    pool = make_pool(n=50, n_labeled=10, seed=18)
    unl, xu, centroids, assignment = ALPSSampling(kmeans_niter=1, kmeans_n_init=2).cluster(
        pool, 6, seed=1
    )
    want_c, want_a, _ = best_kmeans(
        l2_normalize(pool.embeddings)[unl], 6, seed=1, niter=1, n_init=2
    )
    np.testing.assert_array_equal(centroids, want_c)
    np.testing.assert_array_equal(assignment, want_a)
    assert assignment.dtype == np.int64


# ---------------------------------------------------------------------------- cold start helpers


def test_kmeans_inertia_by_hand_and_over_chunks():
    from after_ray.al.strategies.cold_start import kmeans_inertia

    x = np.array([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0]], dtype=np.float32)
    centroids = np.array([[1.0, 0.0], [10.0, 11.0]], dtype=np.float32)
    assert kmeans_inertia(x, centroids, np.array([0, 0, 1])) == 3.0
    # Over more than one 65536-row chunk, in float64 (a float32 sum would lose the small terms).
    rng = np.random.default_rng(19)
    big = (1000.0 + rng.standard_normal((70_000, 2))).astype(np.float32)
    c = big.astype(np.float64).mean(axis=0, keepdims=True).astype(np.float32)
    want = float(((big.astype(np.float64) - c.astype(np.float64)) ** 2).sum())
    assert kmeans_inertia(big, c, np.zeros(70_000, dtype=np.int64)) == pytest.approx(
        want, rel=1e-12
    )


def test_elbow_index_edge_cases_by_hand():
    assert elbow_index([10.0, 2.0, 1.0]) == 1  # three points: the middle one is the elbow
    assert elbow_index([10.0, 9.0, 1.0, 0.5]) == 2  # the elbow next to the last point
    assert elbow_index([10.0, 4.0, 3.0, 2.5]) == 1
    # Relative tolerance: a tiny curve has an elbow too, a straight one does not.
    assert elbow_index([1e-12, 2e-13, 1e-13]) == 1
    assert elbow_index([1.0, 0.5 - 8e-10, 0.0]) == 2  # gap 8e-10 < 1e-9 x W(1): no elbow
    assert elbow_index([1e9, 5e8 - 1.0, 0.0]) == 2  # gap exactly 1e-9 x W(1): still no elbow
    assert elbow_index([5.0, 1.0]) == 1 and elbow_index([5.0]) == 0


def test_best_kmeans_and_elbow_by_value():
    from after_ray.al.kernels.clustering import kmeans
    from after_ray.al.strategies.cold_start import best_kmeans, kmeans_inertia
    from after_ray.seeding import kmeans_restart_seed

    rng = np.random.default_rng(20)
    centers = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0], [6.0, 6.0]])
    x = (centers[rng.integers(0, 4, 200)] + rng.standard_normal((200, 2))).astype(np.float32)
    # K = 1 is the float64 mean, exactly.
    c1, a1, w1 = best_kmeans(x, 1, seed=0)
    np.testing.assert_array_equal(c1, x.astype(np.float64).mean(axis=0, keepdims=True))
    assert a1.tolist() == [0] * 200 and w1 == kmeans_inertia(x, c1, a1)
    # K >= 2: the first of the lowest-inertia restarts, each with its own seed and niter.
    for niter, n_init in ((1, 6), (20, 1)):
        runs = [
            kmeans(x, 4, seed=kmeans_restart_seed(5, n_init, i), niter=niter) for i in range(n_init)
        ]
        inertias = [kmeans_inertia(x, c, a) for c, a in runs]
        first_best = inertias.index(min(inertias))
        got_c, got_a, got_w = best_kmeans(x, 4, seed=5, niter=niter, n_init=n_init)
        np.testing.assert_array_equal(got_c, runs[first_best][0])
        np.testing.assert_array_equal(got_a, runs[first_best][1])
        assert got_w == inertias[first_best] and got_c.shape == (4, 2)
    # Equal inertia (every restart that finds the 4 exact groups has inertia 0, with its
    # centroids in its own order): the earlier run is kept.
    corners = np.repeat(np.array([[0, 0], [10, 0], [0, 10], [10, 10]], np.float32), 10, axis=0)
    runs = [kmeans(corners, 4, seed=kmeans_restart_seed(3, 5, i), niter=20) for i in range(5)]
    zero = [i for i, (c, a) in enumerate(runs) if kmeans_inertia(corners, c, a) == 0.0]
    assert len(zero) >= 2 and not np.array_equal(runs[zero[0]][0], runs[zero[-1]][0])
    np.testing.assert_array_equal(best_kmeans(corners, 4, seed=3, n_init=5)[0], runs[zero[0]][0])
    # Defaults: niter 20, one run (on data where 20 and 21 iterations still differ).
    u = np.random.default_rng(0).random((300, 2)).astype(np.float32)
    c20 = kmeans(u, 8, seed=1, niter=20)[0]
    assert not np.array_equal(c20, kmeans(u, 8, seed=1, niter=21)[0])
    np.testing.assert_array_equal(best_kmeans(u, 8, seed=1)[0], c20)
    np.testing.assert_array_equal(elbow_n_clusters(u, 8, seed=1)[2][8][0], c20)
    k, inertias, runs = elbow_n_clusters(x, 6, seed=1, niter=1, n_init=2)
    assert inertias.dtype == np.float64 and inertias.shape == (6,) and set(runs) == set(range(1, 7))
    for n_clusters in (2, 4):
        np.testing.assert_array_equal(
            runs[n_clusters][0], best_kmeans(x, n_clusters, seed=1, niter=1, n_init=2)[0]
        )

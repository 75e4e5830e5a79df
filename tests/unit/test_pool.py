"""PoolView: what it stores (dtypes, normalised arrays) and every refusal, message in full."""

from __future__ import annotations

import numpy as np
import pytest

from after_ray.al.pool import PoolError, PoolView

IDS = np.array(["a", "b", "c"])
UNLABELED = np.zeros(3, dtype=bool)


def _refusal(**fields) -> str:
    kwargs = {"utt_ids": IDS, "labeled": UNLABELED, **fields}
    with pytest.raises(PoolError) as err:
        PoolView(**kwargs)
    return str(err.value)


def test_stored_arrays_are_normalised_once():
    pool = PoolView(
        utt_ids=np.array(["b", "a", "c"], dtype=object),
        labeled=[True, False, False],
        probs=[[1, 0], [0, 1], [1, 0]],  # integer probabilities are fine, stored as float64
        mc_probs=np.array([[[1, 0]], [[0, 1]], [[1, 0]]]),
        embeddings=np.ones((3, 2), dtype=np.float32),  # float32 stays float32 (memory)
        penultimate=np.ones((3, 4), dtype=np.float16),
        durations=[1, 2, 3],
        speakers=np.array(["s1", None, ""], dtype=object),
    )
    assert pool.utt_ids.dtype.kind == "U" and pool.utt_ids.tolist() == ["b", "a", "c"]
    assert isinstance(pool.labeled, np.ndarray) and pool.labeled.dtype == np.bool_
    assert pool.unlabeled_positions.tolist() == [1, 2] and pool.labeled_positions.tolist() == [0]
    assert pool.n_unlabeled == 2 and len(pool) == 3
    assert pool.probs.dtype == np.float64 and pool.probs.tolist() == [[1, 0], [0, 1], [1, 0]]
    assert pool.mc_probs.dtype == np.float64 and pool.mc_probs.shape == (3, 1, 2)
    assert pool.embeddings.dtype == np.float32
    assert pool.penultimate.dtype == np.float16
    assert pool.durations.dtype == np.float64 and pool.durations.tolist() == [1.0, 2.0, 3.0]
    # None and "" are the same unknown speaker.
    assert pool.speakers.dtype.kind == "U" and pool.speakers.tolist() == ["s1", "", ""]
    assert pool.present_fields() == {
        "probs",
        "mc_probs",
        "embeddings",
        "penultimate",
        "durations",
        "speakers",
    }


def test_take_sort_and_relabel():
    pool = PoolView(
        utt_ids=np.array(["c", "a", "b"]),
        labeled=np.array([False, True, False]),
        embeddings=np.arange(6, dtype=np.float32).reshape(3, 2),
    )
    empty = pool.take([])
    assert len(empty) == 0 and empty.embeddings.shape == (0, 2)
    sub = pool.take(np.array([2, 0]))
    assert sub.utt_ids.tolist() == ["b", "c"] and sub.embeddings.tolist() == [[4, 5], [0, 1]]
    ordered = pool.sorted_by_utt_id()
    assert ordered.utt_ids.tolist() == ["a", "b", "c"]
    assert ordered.labeled.tolist() == [True, False, False]
    assert ordered.embeddings.tolist() == [[2, 3], [4, 5], [0, 1]]
    assert ordered.sorted_by_utt_id() is ordered  # already canonical: no copy of the arrays
    relabeled = pool.with_labeled(np.array([True, True, False]))
    assert relabeled.n_unlabeled == 1 and pool.n_unlabeled == 2


def test_probabilities_at_the_tolerances_are_accepted():
    # A float32 softmax can dip a hair below 0 and sum a hair off 1.
    PoolView(utt_ids=IDS, labeled=UNLABELED, probs=[[1 + 1e-6, -1e-6], [0.5, 0.5], [0.5, 0.5]])
    PoolView(utt_ids=IDS, labeled=UNLABELED, probs=[[0.5, 0.5005], [0.5, 0.5], [0.4995, 0.5]])


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"utt_ids": np.array([["a", "b"]]), "labeled": np.zeros(1, bool)},
            "PoolView.utt_ids must be 1-D, got shape (1, 2)",
        ),
        (
            {"utt_ids": np.array([1, 2, 3])},
            "PoolView.utt_ids must be strings, got dtype int64; pass the utt_id column of the "
            "manifest, not row positions",
        ),
        (
            {"utt_ids": np.array([1, "b", 2, 3, 4], dtype=object), "labeled": np.zeros(5, bool)},
            "PoolView.utt_ids must all be str, found e.g. [1, 2, 3]",
        ),
        (
            {"utt_ids": np.array(list("abbcddeeffgghh")), "labeled": np.zeros(14, bool)},
            "PoolView.utt_ids has 6 duplicate(s), e.g. ['b', 'd', 'e', 'f', 'g']; each utterance "
            "must appear once in the pool",
        ),
        (
            {"utt_ids": np.array(list("abbbc")), "labeled": np.zeros(5, bool)},
            "PoolView.utt_ids has 2 duplicate(s), e.g. ['b']; each utterance must appear once in "
            "the pool",
        ),
        ({"labeled": np.zeros(2, bool)}, "PoolView.labeled must have shape (3,), got (2,)"),
        (
            {"labeled": np.zeros(3, int)},
            "PoolView.labeled must be a bool mask, got dtype int64 (to build it from labeled ids "
            "use np.isin(utt_ids, labeled_ids))",
        ),
        ({"probs": np.array([["x", "y"]] * 3)}, "PoolView.probs must be numeric, got dtype <U1"),
        ({"probs": np.ones((3, 1))}, "PoolView.probs needs at least 2 classes, got 1"),
        (
            {"probs": np.full((2, 2), 0.5)},
            "PoolView.probs must be 2-D with 3 rows (one per utt_id), got shape (2, 2)",
        ),
        (
            {"probs": np.array([[1.2, -0.2], [0.5, 0.5], [0.5, 0.5]])},
            "PoolView.probs has negative entries (min -0.2); pass softmax probabilities, not logits",
        ),
        (
            {"probs": np.array([[0.7, 0.7], [0.5, 0.5], [0.1, 0.2]])},
            "PoolView.probs rows must sum to 1 (within 0.001); 2 do not, one sums to 0.3. Pass "
            "softmax probabilities over the class axis (the last one), not logits",
        ),
        (
            {"probs": np.array([[np.nan, 0.5], [0.5, np.inf], [0.5, 0.5]])},
            "PoolView.probs has non-finite values (NaN or inf) in 2 row(s); check the scoring "
            "stage (fp16 overflow, an empty utterance)",
        ),
        (
            {"mc_probs": np.ones((3, 0, 2))},
            "PoolView.mc_probs needs at least one Monte-Carlo sample (T >= 1)",
        ),
        (
            {"mc_probs": np.ones((3, 2))},
            "PoolView.mc_probs must be 3-D with 3 rows (one per utt_id), got shape (3, 2)",
        ),
        (
            {"mc_probs": np.full((3, 2, 1), 1.0)},
            "PoolView.mc_probs needs at least 2 classes, got 1",
        ),
        (
            {"mc_probs": np.full((3, 2, 2), 0.5), "probs": np.full((3, 3), 1 / 3)},
            "PoolView.mc_probs has 2 classes but probs has 3; both must come from the same "
            "classifier head",
        ),
        (
            {"mc_probs": np.full((3, 2, 2), 0.6)},
            "PoolView.mc_probs rows must sum to 1 (within 0.001); 6 do not, one sums to 1.2. Pass "
            "softmax probabilities over the class axis (the last one), not logits",
        ),
        (
            {"embeddings": np.ones((2, 4))},
            "PoolView.embeddings must be 2-D with 3 rows (one per utt_id), got shape (2, 4)",
        ),
        (
            {"embeddings": np.array([[1.0, np.nan], [np.inf, np.inf], [1, 2]])},
            "PoolView.embeddings has non-finite values (NaN or inf) in 2 row(s); check the "
            "scoring stage (fp16 overflow, an empty utterance)",
        ),
        (
            {"penultimate": np.ones(3)},
            "PoolView.penultimate must be 2-D with 3 rows (one per utt_id), got shape (3,)",
        ),
        (
            {"durations": np.array([1.0, 0.0, -1.0])},
            "PoolView.durations must be > 0 s; 2 are not",
        ),
        (
            {"durations": np.array([0.5, 1.0, 0.0])},
            "PoolView.durations must be > 0 s; 1 are not",
        ),
        (
            {"durations": np.ones((3, 2))},
            "PoolView.durations must be 1-D with 3 rows (one per utt_id), got shape (3, 2)",
        ),
        (
            {"speakers": np.array(["s"] * 2)},
            "PoolView.speakers must have shape (3,) (one speaker id per utt_id), got (2,)",
        ),
        (
            {"speakers": np.array([1, 2, 3])},
            "PoolView.speakers must be strings (speaker ids), got dtype int64",
        ),
        (
            {
                "speakers": np.array([1, "x", None, 2, 3, 4], dtype=object),
                "utt_ids": np.array(list("abcdef")),
                "labeled": np.zeros(6, bool),
            },
            "PoolView.speakers must all be str or None, found e.g. [1, 2, 3]",
        ),
    ],
)
def test_refusals(fields, message):
    assert _refusal(**fields) == message

"""``PoolView``: the read-only input every selection strategy receives.

A ``PoolView`` holds one row per utterance of the pool (labeled and unlabeled together), keyed by
``utt_id``, plus whatever model outputs the scoring stage produced for those rows. It is validated
once, on construction, so strategies can trust shapes, finiteness and probability normalisation
and stay small.

Row order matters only for exact ties inside the geometric kernels (k-center greedy, BADGE
seeding, k-means sampling), which break them by position. Score rankings break ties by
``utt_id``. When the rows come from an unordered source (Ray Data does not keep order), build the
view with :meth:`PoolView.sorted_by_utt_id` so a rerun or a resumed run selects the same items.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from after_ray.errors import AfterRayError

# Softmax outputs in float32 sum to 1 within ~1e-6 per row; a looser bound still catches
# logits passed by mistake or a softmax taken over the wrong axis.
PROB_SUM_ATOL = 1e-3
# Probabilities may come out of float32 softmax a hair below zero after a subtraction.
PROB_MIN = -1e-6

# The optional per-row fields, in the order they are documented.
OPTIONAL_FIELDS = ("probs", "mc_probs", "embeddings", "penultimate", "durations", "speakers")


class PoolError(AfterRayError, ValueError):
    """The pool given to a strategy is malformed, or lacks a field the strategy needs."""


@dataclass(frozen=True, eq=False)
class PoolView:
    """The pool as seen by a selection strategy; every array has one row per utterance.

    Attributes:
        utt_ids: ``[N]`` unique utterance ids (str).
        labeled: ``[N]`` bool, True where the item is already labeled (or queried and pending:
            anything a strategy must not pick again).
        probs: ``[N, C]`` class probabilities of the current model (rows sum to 1).
        mc_probs: ``[N, T, C]`` class probabilities from T Monte-Carlo dropout passes.
        embeddings: ``[N, D]`` utterance embeddings used for distances (pooled encoder output,
            TAPT model in the cold start).
        penultimate: ``[N, H]`` input of the classifier's last linear layer (BADGE).
        durations: ``[N]`` seconds of audio per utterance (> 0).
        speakers: ``[N]`` speaker id per utterance (str, from the manifest's ``speaker``
            column; ``""`` = unknown). Strategies with ``speaker_norm`` z-score the embeddings
            per speaker with it so distances follow emotion rather than voice. No label is in it.
    """

    utt_ids: np.ndarray
    labeled: np.ndarray
    probs: np.ndarray | None = None
    mc_probs: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    penultimate: np.ndarray | None = None
    durations: np.ndarray | None = None
    speakers: np.ndarray | None = None

    def __post_init__(self) -> None:
        # frozen: normalise the stored arrays through object.__setattr__, once.
        set_ = object.__setattr__
        utt_ids = np.asarray(self.utt_ids)
        if utt_ids.ndim != 1:
            raise PoolError(f"PoolView.utt_ids must be 1-D, got shape {utt_ids.shape}")
        if utt_ids.size and utt_ids.dtype.kind not in "UO":
            raise PoolError(
                f"PoolView.utt_ids must be strings, got dtype {utt_ids.dtype}; pass the utt_id "
                "column of the manifest, not row positions"
            )
        if utt_ids.dtype.kind == "O":
            bad = [u for u in utt_ids if not isinstance(u, str)]
            if bad:
                raise PoolError(f"PoolView.utt_ids must all be str, found e.g. {bad[:3]!r}")
            utt_ids = utt_ids.astype(str)
        n = utt_ids.shape[0]
        if n:
            uniq, counts = np.unique(utt_ids, return_counts=True)
            if uniq.shape[0] != n:
                dupes = uniq[counts > 1][:5].tolist()
                raise PoolError(
                    f"PoolView.utt_ids has {n - uniq.shape[0]} duplicate(s), e.g. {dupes}; each "
                    "utterance must appear once in the pool"
                )
        set_(self, "utt_ids", utt_ids)

        labeled = np.asarray(self.labeled)
        if labeled.shape != (n,):
            raise PoolError(f"PoolView.labeled must have shape ({n},), got {labeled.shape}")
        if labeled.dtype != np.bool_:
            raise PoolError(
                f"PoolView.labeled must be a bool mask, got dtype {labeled.dtype} (to build it "
                "from labeled ids use np.isin(utt_ids, labeled_ids))"
            )
        set_(self, "labeled", labeled)

        c = None
        if self.probs is not None:
            probs = _float_array("probs", self.probs, ndim=2, n=n)
            _check_distribution("probs", probs, axis=-1)
            c = probs.shape[1]
            set_(self, "probs", probs)
        if self.mc_probs is not None:
            mc = _float_array("mc_probs", self.mc_probs, ndim=3, n=n)
            if mc.shape[1] < 1:
                raise PoolError("PoolView.mc_probs needs at least one Monte-Carlo sample (T >= 1)")
            _check_distribution("mc_probs", mc, axis=-1)
            if c is not None and mc.shape[2] != c:
                raise PoolError(
                    f"PoolView.mc_probs has {mc.shape[2]} classes but probs has {c}; both must "
                    "come from the same classifier head"
                )
            set_(self, "mc_probs", mc)
        for name in ("embeddings", "penultimate"):
            value = getattr(self, name)
            if value is not None:
                set_(self, name, _float_array(name, value, ndim=2, n=n))
        if self.durations is not None:
            durations = _float_array("durations", self.durations, ndim=1, n=n)
            if (durations <= 0).any():
                raise PoolError(
                    f"PoolView.durations must be > 0 s; {int((durations <= 0).sum())} are not"
                )
            set_(self, "durations", durations)
        if self.speakers is not None:
            set_(self, "speakers", _speaker_array(self.speakers, n))

    def __len__(self) -> int:
        return int(self.utt_ids.shape[0])

    @property
    def n_unlabeled(self) -> int:
        return int(len(self) - np.count_nonzero(self.labeled))

    @property
    def unlabeled_positions(self) -> np.ndarray:
        """Row positions of the unlabeled items, ascending."""
        return np.flatnonzero(~self.labeled)

    @property
    def labeled_positions(self) -> np.ndarray:
        """Row positions of the labeled items, ascending."""
        return np.flatnonzero(self.labeled)

    def present_fields(self) -> set[str]:
        """Names of the optional fields that are set."""
        return {name for name in OPTIONAL_FIELDS if getattr(self, name) is not None}

    def take(self, positions: np.ndarray) -> PoolView:
        """A new view holding only the given rows, in the given order."""
        positions = np.asarray(positions, dtype=np.int64)
        values = {
            f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[positions])
            for f in fields(self)
        }
        return PoolView(**values)

    def sorted_by_utt_id(self) -> PoolView:
        """The same pool with rows in ascending ``utt_id`` order (a canonical row order)."""
        order = np.argsort(self.utt_ids, kind="stable")
        if np.array_equal(order, np.arange(len(self))):
            return self
        return self.take(order)

    def with_labeled(self, labeled: np.ndarray) -> PoolView:
        """The same pool with another labeled mask (e.g. after a round's picks)."""
        return replace(self, labeled=np.asarray(labeled))


def _speaker_array(value: object, n: int) -> np.ndarray:
    speakers = np.asarray(value)
    if speakers.shape != (n,):
        raise PoolError(
            f"PoolView.speakers must have shape ({n},) (one speaker id per utt_id), got "
            f"{speakers.shape}"
        )
    if speakers.size and speakers.dtype.kind not in "UO":
        raise PoolError(
            f"PoolView.speakers must be strings (speaker ids), got dtype {speakers.dtype}"
        )
    if speakers.dtype.kind == "O":
        bad = [s for s in speakers if s is not None and not isinstance(s, str)]
        if bad:
            raise PoolError(f"PoolView.speakers must all be str or None, found e.g. {bad[:3]!r}")
        # None (no speaker known) and "" mean the same: one "unknown" group.
        speakers = np.asarray(["" if s is None else s for s in speakers], dtype=str)
    return speakers.astype(str)


def _float_array(name: str, value: object, *, ndim: int, n: int) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.kind not in "fiu":
        raise PoolError(f"PoolView.{name} must be numeric, got dtype {array.dtype}")
    if array.ndim != ndim or array.shape[0] != n:
        raise PoolError(
            f"PoolView.{name} must be {ndim}-D with {n} rows (one per utt_id), got shape "
            f"{array.shape}"
        )
    if array.dtype.kind != "f":
        array = array.astype(np.float64)
    if not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array).reshape(n, -1).all(axis=1)))
        raise PoolError(
            f"PoolView.{name} has non-finite values (NaN or inf) in {bad} row(s); check the "
            "scoring stage (fp16 overflow, an empty utterance)"
        )
    return array


def _check_distribution(name: str, array: np.ndarray, *, axis: int) -> None:
    if array.shape[axis] < 2:
        raise PoolError(f"PoolView.{name} needs at least 2 classes, got {array.shape[axis]}")
    if (array < PROB_MIN).any():
        raise PoolError(
            f"PoolView.{name} has negative entries (min {float(array.min()):.3g}); pass softmax "
            "probabilities, not logits"
        )
    sums = array.sum(axis=axis, dtype=np.float64)
    error = np.abs(sums - 1.0)
    if error.size and float(error.max()) > PROB_SUM_ATOL:
        worst = float(sums.reshape(-1)[int(np.argmax(error))])
        raise PoolError(
            f"PoolView.{name} rows must sum to 1 (within {PROB_SUM_ATOL}); "
            f"{int(np.count_nonzero(error > PROB_SUM_ATOL))} do not, one sums to {worst:.4g}. "
            "Pass softmax probabilities over the class axis (the last one), not logits"
        )

"""The simulated oracle: labels revealed from the manifest, optionally through noisy annotators.

``SimulatedOracle.label(utt_ids, round)`` answers the way an annotation team would:

* ``votes_per_item=None``: the manifest's hard label is the answer, and the corpus's own recorded
  ``votes`` (restricted to the class set) are passed on for soft-label training.
* ``votes_per_item=k``: k simulated annotators each draw a class from the item's vote
  distribution (the manifest's ``votes``; an item without votes has all its mass on its hard
  label); the label is the majority of the k votes. A tie goes to the manifest label when it is
  among the tied classes, else to the first tied class in ``class_names`` order.
* ``label_noise=p``: every single answer (the hard label, each recorded vote, each drawn vote)
  is replaced with probability p by a uniformly random *other* class, so noisy-label experiments
  cannot leak clean labels through the votes.

Every item's answers come from its own random generator seeded by a hash of ``(seed, utt_id)``,
so an item gets the same label whatever batch it is in, in whatever order, and a resumed run
labels exactly as the uninterrupted one would.

An item without a label in the manifest (the unlabeled pool of a real deployment) cannot be
simulated: that needs people (``al.oracle.kind: human``, see ``after_ray.pipeline.labeling``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from after_ray.errors import ConfigError, CorpusError
from after_ray.seeding import annotator_rng

SOURCE = "simulated"


def majority_label(votes: Sequence[str], class_names: Sequence[str], prefer: str | None) -> str:
    """The most frequent vote; ties go to ``prefer`` if tied, else to the first in class order."""
    counts = {name: 0 for name in class_names}
    for vote in votes:
        counts[vote] += 1
    best = max(counts.values())
    tied = [name for name in class_names if counts[name] == best]
    return prefer if prefer in tied else tied[0]


class SimulatedOracle:
    """Labels from the manifest, through ``votes_per_item`` simulated annotators and noise."""

    source = SOURCE

    def __init__(
        self,
        manifest_rows_by_id: Mapping[str, Mapping[str, Any]],
        votes_per_item: int | None = None,
        label_noise: float = 0.0,
        seed: int = 0,
        class_names: Sequence[str] = (),
    ) -> None:
        if len(class_names) < 2 or len(set(class_names)) != len(class_names):
            raise ConfigError(
                f"the simulated oracle needs at least two distinct class names, got {class_names!r}"
            )
        if votes_per_item is not None and votes_per_item < 1:
            raise ConfigError("al.oracle.votes_per_item: must be at least 1 (or null)")
        if not 0.0 <= label_noise < 1.0:
            raise ConfigError(f"al.oracle.label_noise: must be in [0, 1), got {label_noise}")
        self.rows = manifest_rows_by_id
        self.votes_per_item = votes_per_item
        self.label_noise = float(label_noise)
        self.seed = int(seed)
        self.class_names = list(class_names)
        self._index = {name: i for i, name in enumerate(self.class_names)}

    @classmethod
    def from_config(
        cls,
        oracle_config: Any,
        manifest_rows_by_id: Mapping[str, Mapping[str, Any]],
        class_names: Sequence[str],
    ) -> SimulatedOracle:
        """From an ``al.oracle`` section (duck-typed: votes_per_item, label_noise, seed)."""
        return cls(
            manifest_rows_by_id,
            votes_per_item=oracle_config.votes_per_item,
            label_noise=oracle_config.label_noise,
            seed=oracle_config.seed,
            class_names=class_names,
        )

    def __repr__(self) -> str:
        return (
            f"SimulatedOracle(votes_per_item={self.votes_per_item}, "
            f"label_noise={self.label_noise}, seed={self.seed}, classes={len(self.class_names)})"
        )

    def label(self, utt_ids: Iterable[str], round: int) -> list[dict[str, Any]]:
        """One row per utt_id: ``{utt_id, label, votes, round, source}``.

        Checks the whole batch first: an id missing from the manifest, without a label, or with
        a label outside ``class_names`` raises before anything is answered.
        """
        ids = list(utt_ids)
        for utt_id in ids:
            self._hard_label(utt_id)
        return [self._answer(utt_id, round) for utt_id in ids]

    def _hard_label(self, utt_id: str) -> str:
        row = self.rows.get(utt_id)
        if row is None:
            raise CorpusError(f"{utt_id!r} is not in the manifest the oracle was given")
        label = row.get("label")
        if label is None:
            raise ConfigError(
                f"{utt_id!r} has no label in the manifest (unlabeled pool): a simulated oracle "
                "cannot label it. Set al.oracle.kind: human and label it with `after-ray label "
                "export` / `after-ray label import`"
            )
        if label not in self._index:
            raise CorpusError(
                f"{utt_id!r} is labeled {label!r}, which is not one of the classes "
                f"{self.class_names}: add it to corpus.classes or map it with corpus.label_map"
            )
        return label

    def _recorded_votes(self, utt_id: str) -> list[str]:
        # Votes outside the class set (e.g. IEMOCAP "other" in a 4-class setup) are dropped:
        # a simulated annotator answers within the label set the classifier learns.
        votes = self.rows[utt_id].get("votes") or []
        return [v for v in votes if v in self._index]

    def _noisy(self, answers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Replace each answer with probability label_noise by a uniformly random other class."""
        n_classes = len(self.class_names)
        flip = rng.random(answers.shape[0]) < self.label_noise
        # An offset in 1..C-1 added modulo C is uniform over the other classes.
        offsets = rng.integers(1, n_classes, size=answers.shape[0])
        return np.where(flip, (answers + offsets) % n_classes, answers)

    def _answer(self, utt_id: str, round_index: int) -> dict[str, Any]:
        rng = annotator_rng(self.seed, utt_id)
        hard = self._hard_label(utt_id)
        recorded = self._recorded_votes(utt_id)
        names = self.class_names
        if self.votes_per_item is None:
            label_idx = self._noisy(np.array([self._index[hard]]), rng)[0]
            votes = None
            if recorded:
                drawn = self._noisy(np.array([self._index[v] for v in recorded]), rng)
                votes = [names[i] for i in drawn]
            label = names[int(label_idx)]
        else:
            distribution = np.zeros(len(names))
            for vote in recorded or [hard]:
                distribution[self._index[vote]] += 1.0
            distribution /= distribution.sum()
            drawn = rng.choice(len(names), size=self.votes_per_item, p=distribution)
            votes = [names[i] for i in self._noisy(drawn, rng)]
            label = majority_label(votes, names, prefer=hard)
        return {
            "utt_id": utt_id,
            "label": label,
            "votes": votes,
            "round": round_index,
            "source": SOURCE,
        }


def rows_by_id(rows: Iterable[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    """Manifest rows (e.g. ``table.to_pylist()``) keyed by utt_id."""
    return {row["utt_id"]: row for row in rows}

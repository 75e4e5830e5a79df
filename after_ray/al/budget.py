"""How many labels each round may buy: the cumulative schedule and taking ranked candidates.

A budget has a unit (``BudgetConfig.unit``):

* ``fraction``: ``initial``, ``per_round`` and ``max_total`` are fractions of the training pool.
  Every target is ``floor(fraction * N)`` where N is the size of *this run's* pool (labeled and
  unlabeled together, counted once at the start), for every round alike. The AFTER code took
  the first pick from ``len(pool)`` and every later one from a hard-coded ``int(4508 * 0.05)``,
  so its schedule was wrong on any other fold or corpus; here nothing is hard-coded, and the
  fractions are computed on the same N each time (not on the shrinking unlabeled remainder),
  so "20%" means 20% of the pool.
* ``count``: the same numbers as utterance counts.
* ``seconds``: annotator-seconds (audio duration x annotators per item), the cost a labeling
  vendor charges. A round takes the strategy's ranked candidates in order while they fit the
  round's remaining allowance (:func:`take_within`).

The schedule is cumulative: entry r is the total labeled after round r (round 0 = cold start).
``len(schedule)`` is the number of rounds and of trained models: each round selects up to its
target, labels, then trains and evaluates on everything labeled so far. Nothing is selected after
the last training (the AFTER loop bought one more batch that no model ever saw).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from after_ray.errors import ConfigError, CorpusError

logger = logging.getLogger(__name__)

UNITS = ("fraction", "count", "seconds")
# Fractions like 0.15 * 960 come out as 143.99999999999997 in floating point: flooring must not
# lose the item the user asked for.
_FLOOR_EPS = 1e-9


@dataclass(frozen=True)
class Budget:
    """A labeling budget. Build it with :meth:`from_config` from an ``al.budget`` section."""

    unit: str = "fraction"
    initial: float = 0.10
    per_round: float = 0.05
    max_total: float = 0.20

    def __post_init__(self) -> None:
        problems = []
        if self.unit not in UNITS:
            problems.append(f"al.budget.unit: {self.unit!r} is not one of {', '.join(UNITS)}")
        for name in ("initial", "per_round", "max_total"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                problems.append(f"al.budget.{name}: must be a positive number, got {value!r}")
            elif self.unit == "fraction" and value > 1:
                problems.append(f"al.budget.{name}: a fraction must be at most 1, got {value}")
            elif self.unit == "count" and float(value) != int(value):
                problems.append(f"al.budget.{name}: a count must be a whole number, got {value}")
        if not problems and self.initial > self.max_total:
            problems.append(
                f"al.budget.initial ({self.initial}) exceeds al.budget.max_total ({self.max_total})"
            )
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    def from_config(cls, config: Any) -> Budget:
        """From any object with ``unit``, ``initial``, ``per_round``, ``max_total`` (duck-typed:
        ``BudgetConfig`` or a plain namespace)."""
        return cls(
            unit=config.unit,
            initial=config.initial,
            per_round=config.per_round,
            max_total=config.max_total,
        )

    @property
    def measure(self) -> str:
        """What :meth:`schedule` counts: ``items`` or ``annotator_seconds``."""
        return "annotator_seconds" if self.unit == "seconds" else "items"

    def _unit_targets(self) -> list[float]:
        """initial, initial + per_round, ... capped at max_total, in the budget's own unit."""
        # Multiply instead of accumulating so 0.1 + 0.05 + 0.05 cannot drift past max_total.
        steps = math.ceil((self.max_total - self.initial) / self.per_round - _FLOOR_EPS)
        values = [self.initial + k * self.per_round for k in range(max(steps, 0) + 1)]
        return [min(v, self.max_total) for v in values]

    def schedule(
        self,
        pool: int | Sequence[Any] | Mapping[str, Any],
        votes_per_item: int = 1,
    ) -> list[int] | list[float]:
        """Cumulative target per round: labeled items, or annotator-seconds for ``seconds``.

        ``pool``: the pool size, or the pool itself (anything with ``len``); for ``seconds``,
        the pool's durations (``{utt_id: seconds}`` or a sequence), which cap the schedule at
        what labeling the whole pool would cost.
        """
        if votes_per_item < 1:
            raise ValueError(f"votes_per_item must be >= 1, got {votes_per_item}")
        if self.unit == "seconds":
            capacity = pool_annotator_seconds(pool, votes_per_item)
            targets: list[float] = [float(v) for v in self._unit_targets()]
            what = f"{capacity:.1f} annotator-seconds"
        else:
            size = pool if isinstance(pool, int) else len(pool)
            if size <= 0:
                raise CorpusError("the training pool is empty: there is nothing to label")
            capacity = size
            if self.unit == "fraction":
                targets = [math.floor(v * size + _FLOOR_EPS) for v in self._unit_targets()]
            else:
                targets = [int(v) for v in self._unit_targets()]
            what = f"{size} items"
            if targets[0] < 1:
                raise ConfigError(
                    f"al.budget.initial: {self.initial} of a pool of {size} items is 0 items; "
                    "raise it (or use unit: count)"
                )
        if targets[-1] > capacity:
            logger.warning(
                "the budget (%s %s) exceeds the pool (%s); the schedule stops when the pool is "
                "fully labeled",
                self.max_total,
                self.unit,
                what,
            )
        out: list[Any] = []
        for target in targets:
            target = min(target, capacity)
            if not out or target > out[-1]:
                out.append(target)
        return out

    def round_sizes(self, pool: int | Sequence[Any] | Mapping[str, Any]) -> list[int]:
        """Items to select in each round (differences of the schedule; item units only)."""
        if self.unit == "seconds":
            raise ValueError(
                "a seconds budget has no fixed round sizes: take candidates with take_within"
            )
        cumulative = self.schedule(pool)
        return [b - a for a, b in zip([0, *cumulative[:-1]], cumulative, strict=True)]

    def take(
        self,
        ranked_ids: Sequence[str],
        *,
        target: float,
        spent: float,
        durations: Mapping[str, float] | None = None,
        votes_per_item: int = 1,
    ) -> list[str]:
        """The candidates this round buys: ranked best first, up to ``target`` (this round's
        schedule entry) minus ``spent`` (labeled items, or annotator-seconds already spent)."""
        remaining = target - spent
        if remaining <= 0:
            return []
        if self.unit == "seconds":
            if durations is None:
                raise ValueError("a seconds budget needs the candidates' durations")
            return take_within(ranked_ids, durations, remaining, votes_per_item)
        return list(ranked_ids[: int(remaining)])


def _usable_duration(value: Any, name: str) -> float:
    seconds = float("nan") if value is None else float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise CorpusError(
            f"utterance {name} has no usable duration ({value!r}); a seconds budget needs "
            "every duration: run `after-ray prepare`, which reads them from the audio headers"
        )
    return seconds


def _duration_of(utt_id: str, durations: Mapping[str, float]) -> float:
    return _usable_duration(durations.get(utt_id), repr(utt_id))


def pool_annotator_seconds(
    durations: Mapping[str, Any] | Sequence[Any] | int, votes_per_item: int = 1
) -> float:
    """What labeling the whole pool would cost, in annotator-seconds."""
    if isinstance(durations, int):
        raise ValueError("a seconds budget needs the pool's durations, not its size")
    if isinstance(durations, Mapping):
        total = sum(_duration_of(u, durations) for u in durations)
    else:
        total = sum(_usable_duration(d, f"#{i}") for i, d in enumerate(durations))
    return total * votes_per_item


def annotator_seconds(
    utt_ids: Sequence[str], durations: Mapping[str, float], votes_per_item: int = 1
) -> float:
    """The cost of labeling ``utt_ids`` with ``votes_per_item`` annotators each."""
    return sum(_duration_of(u, durations) for u in utt_ids) * votes_per_item


def take_within(
    ordered_candidate_ids: Sequence[str],
    durations: Mapping[str, float],
    remaining_seconds: float,
    votes_per_item: int = 1,
) -> list[str]:
    """Take candidates in order while their annotator-seconds fit in ``remaining_seconds``.

    Stops at the first candidate that does not fit instead of skipping it: skipping would let
    short clips jump the strategy's ranking and bias every batch toward short utterances. The
    unspent allowance carries over, since the schedule is cumulative.
    """
    if votes_per_item < 1:
        raise ValueError(f"votes_per_item must be >= 1, got {votes_per_item}")
    taken: list[str] = []
    spent = 0.0
    for utt_id in ordered_candidate_ids:
        cost = _duration_of(utt_id, durations) * votes_per_item
        if spent + cost > remaining_seconds + _FLOOR_EPS:
            break
        taken.append(utt_id)
        spent += cost
    return taken

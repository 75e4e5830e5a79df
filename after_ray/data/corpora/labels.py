"""Canonical emotion names, each corpus's code -> canonical map, label maps and named presets.

Loaders emit canonical names only (``CANONICAL``). A *label map* ``{canonical: class or None}``
then folds them into the classes of an experiment: ``apply_label_map`` maps the label and every
vote, dropping votes for classes mapped to None. ``FOUR_CLASS`` is the paper's 4-class task
(IEMOCAP convention: excited counts as happy), also used for the "Merged" set.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from after_ray.errors import ConfigError

CANONICAL = (
    "neutral",
    "happy",
    "angry",
    "sad",
    "fear",
    "disgust",
    "surprise",
    "calm",
    "excited",
    "frustrated",
    "contempt",
    "boredom",
    "other",
)

# Spellings seen in corpora, folder names and user CSVs (lower-cased) -> canonical name.
SYNONYMS = {
    **{name: name for name in CANONICAL},
    "neu": "neutral",
    "n": "neutral",
    "neutral state": "neutral",
    "hap": "happy",
    "happiness": "happy",
    "joy": "happy",
    "ang": "angry",
    "anger": "angry",
    "sadness": "sad",
    "fea": "fear",
    "fearful": "fear",
    "dis": "disgust",
    "disgusted": "disgust",
    "sur": "surprise",
    "surprised": "surprise",
    "pleasant_surprise": "surprise",
    "pleasant_surprised": "surprise",
    "exc": "excited",
    "excitement": "excited",
    "fru": "frustrated",
    "frustration": "frustrated",
    "contemptuous": "contempt",
    "bored": "boredom",
    "oth": "other",
}

# --- per-corpus codes -> canonical names (None = no usable label) ---------------------------
# IEMOCAP consensus codes on the summary line; "xxx" means the raters had no majority.
IEMOCAP_CODES: dict[str, str | None] = {
    "neu": "neutral",
    "hap": "happy",
    "exc": "excited",
    "ang": "angry",
    "sad": "sad",
    "fru": "frustrated",
    "sur": "surprise",
    "fea": "fear",
    "dis": "disgust",
    "oth": "other",
    "xxx": None,
}
# IEMOCAP category words on the per-rater ``C-`` lines.
IEMOCAP_WORDS: dict[str, str] = {
    "neutral": "neutral",
    "neutral state": "neutral",
    "frustration": "frustrated",
    "anger": "angry",
    "sadness": "sad",
    "happiness": "happy",
    "excited": "excited",
    "surprise": "surprise",
    "fear": "fear",
    "disgust": "disgust",
    "other": "other",
}
# SAVEE file-name codes (two-letter codes must be matched before one-letter ones).
SAVEE_CODES = {
    "a": "angry",
    "d": "disgust",
    "f": "fear",
    "h": "happy",
    "n": "neutral",
    "sa": "sad",
    "su": "surprise",
}
# RAVDESS third field of the file name.
RAVDESS_CODES = {
    "01": "neutral",
    "02": "calm",
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fear",
    "07": "disgust",
    "08": "surprise",
}
# CREMA-D emotion field of the file name.
CREMAD_CODES = {
    "ANG": "angry",
    "DIS": "disgust",
    "FEA": "fear",
    "HAP": "happy",
    "NEU": "neutral",
    "SAD": "sad",
}
# CREMA-D tabulatedVotes.csv vote-count columns.
CREMAD_VOTE_COLUMNS = {
    "A": "angry",
    "D": "disgust",
    "F": "fear",
    "H": "happy",
    "N": "neutral",
    "S": "sad",
}
# EmoDB emotion letter (German initials). W (Wut) is anger, not happiness; A (Angst) is fear.
EMODB_CODES = {
    "W": "angry",
    "L": "boredom",
    "E": "disgust",
    "A": "fear",
    "F": "happy",
    "T": "sad",
    "N": "neutral",
}
# MSP-Podcast EmoClass; X = no agreement among annotators.
MSP_PODCAST_CODES: dict[str, str | None] = {
    "A": "angry",
    "S": "sad",
    "H": "happy",
    "U": "surprise",
    "F": "fear",
    "D": "disgust",
    "C": "contempt",
    "N": "neutral",
    "O": "other",
    "X": None,
}

# --- presets ---------------------------------------------------------------------------------
# The paper's 4-class task (IEMOCAP convention: excited counts as happy) and the Merged set.
FOUR_CLASS: dict[str, str | None] = {
    "neutral": "neutral",
    "happy": "happy",
    "excited": "happy",
    "angry": "angry",
    "sad": "sad",
}
# The six basic emotions plus neutral: the classes the acted corpora (CREMA-D, RAVDESS, SAVEE,
# EmoDB, MSP-Podcast) share most often.
SEVEN_CLASS: dict[str, str | None] = {
    name: name for name in ("neutral", "happy", "angry", "sad", "fear", "disgust", "surprise")
}
PRESETS: dict[str, dict[str, str | None]] = {"four_class": FOUR_CLASS, "seven_class": SEVEN_CLASS}


def canonical(label: str | None) -> str | None:
    """A corpus or user spelling -> canonical name (unknown spellings lower-cased as they are)."""
    if label is None:
        return None
    text = str(label).strip().lower()
    if not text:
        return None
    return SYNONYMS.get(text, SYNONYMS.get(text.replace("-", "_"), text))


def resolve_label_map(spec: str | Mapping[str, str | None] | None) -> dict[str, str | None] | None:
    """``corpus.label_map``: a preset name, an explicit mapping, or None (labels as they are)."""
    if spec is None:
        return None
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key not in PRESETS:
            raise ConfigError(
                f"corpus.label_map: unknown preset {spec!r}; presets: {', '.join(PRESETS)} "
                "(or give a mapping {source_label: class or null})"
            )
        return dict(PRESETS[key])
    return {canonical(k) or k: (canonical(v) if v is not None else None) for k, v in spec.items()}


def apply_label_map(
    rows: Iterable[Mapping[str, Any]],
    mapping: Mapping[str, str | None],
    *,
    drop_unmapped: bool = True,
) -> list[dict[str, Any]]:
    """New rows with ``label`` and every entry of ``votes`` mapped through ``mapping``.

    - A label mapped to None, or absent from the mapping, drops the row when ``drop_unmapped``.
      Without ``drop_unmapped``, a label mapped to None becomes None (the row joins the unlabeled
      pool) and a label absent from the mapping is kept as it is.
    - Votes for classes mapped to None are removed (and, when ``drop_unmapped``, votes for
      classes absent from the mapping too); a row left with no votes gets ``votes=None``.
    - Rows that were unlabeled to begin with (label None) are always kept: they are pool rows.
    """
    out = []
    for row in rows:
        label = row.get("label")
        if label is None:
            new_label = None
        elif mapping.get(label) is not None:
            new_label = mapping[label]
        elif drop_unmapped:
            continue
        else:
            new_label = None if label in mapping else label
        votes = row.get("votes")
        new_votes = None
        if votes is not None:
            new_votes = [m for m in (_map_vote(v, mapping, drop_unmapped) for v in votes) if m]
        out.append({**row, "label": new_label, "votes": new_votes or None})
    return out


def _map_vote(vote: str, mapping: Mapping[str, str | None], drop_unmapped: bool) -> str | None:
    if vote in mapping:
        return mapping[vote]
    return None if drop_unmapped else vote

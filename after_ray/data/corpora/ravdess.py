"""RAVDESS: ``Actor_XX/MM-VV-EE-II-SS-RR-AA.wav`` at 48 kHz, 24 actors.

Fields: modality (03 = audio-only), vocal channel (01 speech, 02 song), emotion, intensity,
statement, repetition, actor (odd = male, even = female). Only audio-only files are read; song
files are left out unless ``include_song=True``. The Kaggle copy holds the speech set twice
(``Actor_01/`` and ``audio_speech_actors_01-24/Actor_01/``); every file name is unique in the
corpus, so each is kept once, from its least nested copy.
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
from after_ray.data.corpora.labels import RAVDESS_CODES

CORPUS = "ravdess"
EXPECTED = (
    "expected Actor_XX/03-01-EE-II-SS-RR-AA.wav files; point corpus.root at "
    "Audio_Speech_Actors_01-24 (or a folder holding it)"
)
FILE_NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)\.wav$", re.IGNORECASE)
AUDIO_ONLY = "03"
SPEECH, SONG = "01", "02"


def load(root: str | Path, *, include_song: bool = False) -> list[dict[str, Any]]:
    """Manifest rows of the RAVDESS speech files (and song files with ``include_song``)."""
    root = require_dir(root, "RAVDESS", EXPECTED)
    skips = Skips()
    copies: dict[str, list[Path]] = {}
    for path in walk_files(root, skips):
        match = FILE_NAME.match(path.name)
        if match is None:
            reason = "non-WAV files" if path.suffix.lower() != ".wav" else "WAVs not named 03-..."
            skips.add(reason, path)
            continue
        modality, channel, emotion = match.group(1), match.group(2), match.group(3)
        if modality != AUDIO_ONLY or channel not in (SPEECH, SONG) or emotion not in RAVDESS_CODES:
            skips.add("names with unknown field codes", path)
            continue
        if channel == SONG and not include_song:
            skips.add("song files (include_song=False)", path)
            continue
        copies.setdefault(path.name.lower(), []).append(path)
    rows = []
    for paths in copies.values():
        chosen, *duplicates = shallowest_first(paths)
        for dup in duplicates:
            skips.add("duplicate copies", dup)
        fields = FILE_NAME.match(chosen.name)
        assert fields is not None  # matched above
        actor = fields.group(7)
        rows.append(
            make_row(
                utt_id=utt_id_for(CORPUS, root, chosen),
                path=chosen,
                label=RAVDESS_CODES[fields.group(3)],
                speaker=f"{CORPUS}/{actor}",
                gender="M" if int(actor) % 2 == 1 else "F",
                corpus=CORPUS,
            )
        )
    return finish(rows, corpus=CORPUS, root=root, skips=skips, expected=EXPECTED, title="RAVDESS")

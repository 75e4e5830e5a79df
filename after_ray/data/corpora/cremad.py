"""CREMA-D: ``AudioWAV/{Actor}_{SENT}_{EMO}_{LVL}.wav`` (16 kHz), 91 actors, 6 acted emotions.

The label is the *acted* emotion in the file name. When present:

- ``VideoDemographics.csv`` (ActorID, Sex) gives the gender;
- ``processedResults/tabulatedVotes.csv`` gives the crowd's *perceived* emotion from the voice
  alone (rows whose index // 100000 == 1): the vote counts of columns A, D, F, H, N, S are
  expanded into one entry per response, e.g. A=2, N=1 -> [angry, angry, neutral]. Perceived
  audio labels differ a lot from the acted ones, which is what makes them useful soft targets.

Only WAVs are read (``AudioMP3/`` is ignored). Known bad clips (e.g. the silent
``1076_MTI_SAD_XX``) are loaded like any other; the prepare stage's audio checks quarantine them.
"""

from __future__ import annotations

import csv
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
from after_ray.data.corpora.labels import CREMAD_CODES, CREMAD_VOTE_COLUMNS
from after_ray.errors import CorpusError

CORPUS = "cremad"
EXPECTED = (
    "expected AudioWAV/<actor>_<sentence>_<emotion>_<level>.wav files (e.g. 1001_DFA_ANG_XX.wav); "
    "point corpus.root at the CREMA-D checkout holding AudioWAV/"
)
FILE_STEM = re.compile(r"^(\d{4})_([A-Z]{3})_([A-Z]{3})_(LO|MD|HI|XX)$")
VOICE_ONLY = 1  # row index // 100000 in tabulatedVotes.csv: 1 voice, 2 face, 3 audio-visual


def load(root: str | Path, *, use_votes: bool = True) -> list[dict[str, Any]]:
    """Manifest rows of the CREMA-D WAVs, with gender and voice-only votes when available."""
    root = require_dir(root, "CREMA-D", EXPECTED)
    audio_dir = root / "AudioWAV" if (root / "AudioWAV").is_dir() else root
    # Metadata sits next to AudioWAV/; also found when the root is AudioWAV/ itself.
    genders = read_genders(_metadata(root, "VideoDemographics.csv"))
    votes_path = _metadata(root, "processedResults/tabulatedVotes.csv")
    votes = read_voice_votes(votes_path) if use_votes and votes_path.is_file() else {}
    skips = Skips()
    rows = []
    for path in list_dir_files(audio_dir, skips):
        if path.suffix.lower() != ".wav":
            skips.add("non-WAV files", path)
            continue
        match = FILE_STEM.match(path.stem)
        if match is None or match.group(3) not in CREMAD_CODES:
            skips.add("WAVs not named like CREMA-D clips", path)
            continue
        actor = match.group(1)
        rows.append(
            make_row(
                utt_id=utt_id_for(CORPUS, root, path),
                path=path,
                label=CREMAD_CODES[match.group(3)],
                votes=votes.get(path.stem),
                speaker=f"{CORPUS}/{actor}",
                gender=genders.get(actor),
                corpus=CORPUS,
            )
        )
    return finish(rows, corpus=CORPUS, root=root, skips=skips, expected=EXPECTED, title="CREMA-D")


def _metadata(root: Path, relative: str) -> Path:
    candidates = [root / relative, root.parent / relative]
    return next((p for p in candidates if p.is_file()), candidates[0])


def read_genders(path: Path) -> dict[str, str]:
    """ActorID -> "F"/"M" from VideoDemographics.csv ({} when the file is absent)."""
    if not path.is_file():
        return {}
    out = {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        for record in csv.DictReader(handle):
            actor = (record.get("ActorID") or "").strip()
            sex = (record.get("Sex") or "").strip().lower()
            if actor and sex in ("male", "female"):
                out[actor] = "M" if sex == "male" else "F"
    return out


def read_voice_votes(path: Path) -> dict[str, list[str]]:
    """Clip stem -> one label per voice-only response, from tabulatedVotes.csv."""
    out: dict[str, list[str]] = {}
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        needed = ["fileName", *CREMAD_VOTE_COLUMNS]
        missing = [c for c in needed if c not in header]
        if missing or not header:
            raise CorpusError(
                f"CREMA-D votes file {str(path)!r} lacks columns {missing}: expected the "
                "processedResults/tabulatedVotes.csv of the CREMA-D repository (or pass "
                "use_votes: false)"
            )
        index_column = header[0]
        for line, record in enumerate(reader, start=2):
            try:
                index = int(record[index_column])
                counts = {c: int(float(record[c] or 0)) for c in CREMAD_VOTE_COLUMNS}
            except ValueError as exc:
                raise CorpusError(
                    f"CREMA-D votes file {str(path)!r} line {line}: non-numeric index or vote "
                    f"count ({exc})"
                ) from exc
            if index // 100000 != VOICE_ONLY:
                continue
            stem = Path(record["fileName"].strip()).stem
            out[stem] = [
                CREMAD_VOTE_COLUMNS[c] for c in CREMAD_VOTE_COLUMNS for _ in range(counts[c])
            ]
    return out

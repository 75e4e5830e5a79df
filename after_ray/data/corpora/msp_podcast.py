"""MSP-Podcast: consensus labels from ``Labels/labels_consensus.csv``, audio in ``Audios/``.

The label file has been spelled ``labels_concensus.csv`` (before v1.10) and lived in ``label/``
(v1.6) or ``labels/`` (v1.9); all are found. Audio is in ``Audios/`` (``Audio/`` in EmoBox).

- Label: EmoClass A, S, H, U, F, D, C, N, O -> canonical; X (no agreement) is dropped unless
  ``keep_no_agreement=True`` (then label None: an unlabeled pool row).
- Split: Split_Set Train -> train, Development/Validation -> val, Test1/Test2/Test3 -> test.
- Speaker: ``msp_podcast/<SpkrID>``. ``Unknown`` speakers become ``msp_podcast/unknown-<stem>``,
  one per file, so that thousands of different podcasters are never merged into one "speaker"
  (that would put them all on one side of a speaker-independent split).
- Rows whose audio file is missing are skipped with a log line (v2.0 lacks at least one file).
- Per-annotator votes (``labels_detailed``) are not read: its format differs between releases.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Any

from after_ray.data.corpora.common import Skips, finish, log, make_row, require_dir
from after_ray.data.corpora.labels import MSP_PODCAST_CODES
from after_ray.errors import CorpusError

CORPUS = "msp_podcast"
EXPECTED = (
    "expected Labels/labels_consensus.csv (or labels_concensus.csv, or a label/ or labels/ "
    "folder) and the audio in Audios/ or Audio/; point corpus.root at the MSP-Podcast release"
)
LABEL_DIRS = ("Labels", "labels", "label", "Label", ".")
LABEL_NAMES = ("labels_consensus.csv", "labels_concensus.csv")
AUDIO_DIRS = ("Audios", "Audio", "audios", "audio")
SPLITS = {
    "train": "train",
    "development": "val",
    "validation": "val",
    "dev": "val",
    "test1": "test",
    "test2": "test",
    "test3": "test",
    "test": "test",
}
MISSING_LOGGED = 10  # missing files named one by one at INFO level; the rest at DEBUG
GENDERS = {"male": "M", "female": "F", "m": "M", "f": "F"}


def find_labels_file(root: Path) -> Path | None:
    for directory in LABEL_DIRS:
        for name in LABEL_NAMES:
            candidate = root / directory / name
            if candidate.is_file():
                return candidate
    return None


def load(
    root: str | Path,
    *,
    keep_no_agreement: bool = False,
    labels_file: str | None = None,
    audio_dir: str | None = None,
) -> list[dict[str, Any]]:
    """Manifest rows of the MSP-Podcast files listed in the consensus labels."""
    root = require_dir(root, "MSP-Podcast", EXPECTED)
    labels_path = (root / labels_file) if labels_file else find_labels_file(root)
    if labels_path is None or not labels_path.is_file():
        raise CorpusError(f"MSP-Podcast root {str(root)!r} has no consensus label file: {EXPECTED}")
    audio = _audio_dir(root, audio_dir)
    # One directory listing instead of one stat per row: the consensus file has ~10^5 rows.
    present = {e.name for e in os.scandir(audio) if e.is_file() and not e.name.startswith("._")}
    skips = Skips()
    rows = []
    unknown_splits: set[str] = set()
    with open(labels_path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        header = reader.fieldnames or []
        missing = [c for c in ("FileName", "EmoClass") if c not in header]
        if missing:
            raise CorpusError(
                f"MSP-Podcast label file {str(labels_path)!r} lacks columns {missing}; expected "
                "FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set"
            )
        for line, record in enumerate(reader, start=2):
            name = (record.get("FileName") or "").strip()
            code = (record.get("EmoClass") or "").strip().upper()
            if not name or code not in MSP_PODCAST_CODES:
                skips.add("label rows with no file name or an unknown EmoClass", f"line {line}")
                continue
            label = MSP_PODCAST_CODES[code]
            if label is None and not keep_no_agreement:
                skips.add("no-agreement (X) rows", name)
                continue
            if name not in present:
                reason = "labeled files missing from the audio folder"
                # Name the first few; the summary line counts them all.
                level = logging.INFO if skips[reason] < MISSING_LOGGED else logging.DEBUG
                log.log(level, "msp_podcast: %s is labeled but missing from %s", name, audio)
                skips.add(reason, name)
                continue
            path = audio / name
            speaker_id = (record.get("SpkrID") or "").strip()
            if not speaker_id or speaker_id.lower() == "unknown":
                speaker_id = f"unknown-{path.stem}"
            split_text = (record.get("Split_Set") or "").strip().lower()
            rows.append(
                make_row(
                    utt_id=f"{CORPUS}/{path.relative_to(root).with_suffix('').as_posix()}",
                    path=path,
                    label=label,
                    speaker=f"{CORPUS}/{speaker_id}",
                    gender=GENDERS.get((record.get("Gender") or "").strip().lower()),
                    corpus=CORPUS,
                    split=SPLITS.get(split_text),
                )
            )
            if split_text and split_text not in SPLITS:
                unknown_splits.add(split_text)
    if unknown_splits:
        log.warning(
            "msp_podcast: unknown Split_Set values %s in %s; those rows have no split",
            sorted(unknown_splits),
            labels_path,
        )
    return finish(
        rows, corpus=CORPUS, root=root, skips=skips, expected=EXPECTED, title="MSP-Podcast"
    )


def _audio_dir(root: Path, override: str | None) -> Path:
    candidates = [override] if override else list(AUDIO_DIRS)
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    raise CorpusError(
        f"MSP-Podcast root {str(root)!r} has no audio folder {' or '.join(candidates)}: {EXPECTED}"
    )

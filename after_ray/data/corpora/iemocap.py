"""IEMOCAP (``IEMOCAP_full_release/``): labels from ``Session*/dialog/EmoEvaluation/*.txt``.

Each EmoEvaluation file holds one block per utterance: a consensus line
``[start - end]<TAB>utt_id<TAB>code<TAB>[V, A, D]`` followed by per-rater lines. The label is
the consensus code; the votes are the categories of the *external* raters' ``C-E*`` lines (a
line may list several categories, each counts); the actors' self-evaluations ``C-F1``/``C-M1``
are left out. The per-annotator folders (Categorical/, Attribute/, Self-evaluation/) and macOS
``._*`` files are never read: the glob is non-recursive.

The speaker is the one who says the utterance: ``Ses0N`` + the first letter of the last ``_``
segment (``Ses01F_impro01_M001`` is said by the *male* actor of session 1). The dialog prefix
only names who wore the motion-capture markers.

``xxx`` (no majority among raters): dropped by default; ``keep_no_agreement=True`` keeps those
rows with label None and their votes, so they can serve as unlabeled pool rows or soft targets.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from after_ray.data.corpora.common import Skips, finish, list_dir_files, log, make_row, require_dir
from after_ray.data.corpora.labels import IEMOCAP_CODES, IEMOCAP_WORDS
from after_ray.errors import CorpusError

CORPUS = "iemocap"
EXPECTED = (
    "expected Session1..Session5 folders holding dialog/EmoEvaluation/*.txt and "
    "sentences/wav/<dialog>/<utt>.wav; point corpus.root at the IEMOCAP_full_release directory"
)
# The consensus line; whitespace is matched loosely because hand-edited copies exist.
CONSENSUS_LINE = re.compile(r"^\[(\d+\.\d+)\s*-\s*(\d+\.\d+)\]\s+(\w+)\s+(\w+)\s+\[([^\]]*)\]\s*$")
# A categorical rater line: ``C-E2:<TAB>Neutral; Frustration;<TAB>(comment)``.
CATEGORY_LINE = re.compile(r"^C-([A-Z]+)(\d*):\s*(.*)$")
UTTERANCE_ID = re.compile(r"^(Ses0\d)[FM]_.+_([FM])[A-Z\d]{2}\d$")
SESSION_DIR = re.compile(r"^Session\d+$")
MISSING_LOGGED = 10  # missing WAVs named one by one at INFO level; the rest at DEBUG


def load(root: str | Path, *, keep_no_agreement: bool = False) -> list[dict[str, Any]]:
    """Manifest rows of every evaluated IEMOCAP sentence whose WAV exists."""
    root = require_dir(root, "IEMOCAP", EXPECTED)
    if not _session_dirs(root) and (root / "IEMOCAP_full_release").is_dir():
        root = (root / "IEMOCAP_full_release").resolve()
    skips = Skips()
    eval_files = [
        (session, path)
        for session in _session_dirs(root)
        for path in _evaluation_files(session / "dialog" / "EmoEvaluation", skips)
    ]
    if not eval_files:
        raise CorpusError(
            f"IEMOCAP root {str(root)!r} has no Session*/dialog/EmoEvaluation/*.txt: {EXPECTED}"
        )
    rows = []
    for session_dir, eval_path in eval_files:
        for utt, code, votes in parse_emo_evaluation(eval_path, skips):
            label = IEMOCAP_CODES[code]
            if label is None and not keep_no_agreement:
                skips.add("no-agreement (xxx) utterances", utt)
                continue
            match = UTTERANCE_ID.match(utt)
            if match is None:
                skips.add("unparsable utterance ids", f"{eval_path}: {utt}")
                continue
            dialog = utt.rsplit("_", 1)[0]
            wav = session_dir / "sentences" / "wav" / dialog / f"{utt}.wav"
            if not wav.is_file():
                reason = "labeled utterances without a WAV"
                # Name the first few; the summary line counts them all.
                level = logging.INFO if skips[reason] < MISSING_LOGGED else logging.DEBUG
                log.log(level, "iemocap: %s (labeled in %s) has no WAV %s", utt, eval_path, wav)
                skips.add(reason, wav)
                continue
            letter = match.group(2)
            rows.append(
                make_row(
                    utt_id=f"{CORPUS}/{wav.relative_to(root).with_suffix('').as_posix()}",
                    path=wav,
                    label=label,
                    votes=votes,
                    speaker=f"{CORPUS}/{match.group(1)}{letter}",
                    session=session_dir.name,
                    gender=letter,
                    corpus=CORPUS,
                )
            )
    return finish(rows, corpus=CORPUS, root=root, skips=skips, expected=EXPECTED, title="IEMOCAP")


def parse_emo_evaluation(
    path: Path, skips: Skips | None = None
) -> list[tuple[str, str, list[str]]]:
    """``(utt_id, consensus code, external-rater votes)`` per block of one EmoEvaluation file."""
    blocks: list[tuple[str, str, list[str]]] = []
    current: tuple[str, str, list[str]] | None = None
    text = path.read_text(encoding="utf-8", errors="replace")
    for line in text.splitlines():
        line = line.rstrip("\r")
        consensus = CONSENSUS_LINE.match(line)
        if consensus is not None:
            utt, code = consensus.group(3), consensus.group(4).lower()
            if code not in IEMOCAP_CODES:
                if skips is not None:
                    skips.add("unknown consensus codes", f"{path}: {line.strip()}")
                current = None
                continue
            current = (utt, code, [])
            blocks.append(current)
            continue
        category = CATEGORY_LINE.match(line)
        if category is not None and current is not None and category.group(1) == "E":
            current[2].extend(_categories(category.group(3)))
    return blocks


def _categories(body: str) -> list[str]:
    """``Neutral; Frustration;<TAB>(free comment)`` -> ["neutral", "frustrated"].

    Words outside the documented list (e.g. ``Other:nervous``) count as ``other``: raters used the
    Other box for them.
    """
    body = re.sub(r"\(.*\)\s*$", "", body)
    out = []
    for part in body.split(";"):
        word = part.split(":", 1)[0].strip().lower()
        if word:
            out.append(IEMOCAP_WORDS.get(word, "other"))
    return out


def _session_dirs(root: Path) -> list[Path]:
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and SESSION_DIR.match(p.name)),
        key=lambda p: int(p.name[len("Session") :]),
    )


def _evaluation_files(directory: Path, skips: Skips) -> list[Path]:
    """The dialog-level ``*.txt`` files (sub-folders hold per-annotator files: not read)."""
    if not directory.is_dir():
        return []
    out = []
    for path in list_dir_files(directory, skips):
        if path.suffix.lower() == ".txt":
            out.append(path)
        else:
            skips.add("non-.txt files in EmoEvaluation", path)
    return out

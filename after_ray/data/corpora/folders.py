"""A folder-per-class corpus: ``root/<label>/**/*.{wav,flac,ogg}``.

The label is the top-level folder's name, lower-cased and mapped to the canonical name when it
is a known spelling (``Angry``, ``anger`` -> angry). ``classes`` (optional) restricts which
folders are labels; other folders are then skipped and counted. Files directly in the root are
skipped. The speaker comes from ``speaker_regex`` (searched in the path below the root, POSIX
slashes; its ``speaker`` named group, else its first group, else the whole match), otherwise it
is ``<corpus>/unknown``. The corpus name (``corpus_name``) defaults to the root folder's name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from after_ray.data.corpora.common import (
    Skips,
    finish,
    is_audio,
    make_row,
    require_dir,
    utt_id_for,
    walk_files,
)
from after_ray.data.corpora.labels import canonical
from after_ray.errors import ConfigError

EXPECTED = "expected one folder per class holding audio files (root/<label>/**/*.wav|flac|ogg)"


def load(
    root: str | Path,
    *,
    corpus_name: str | None = None,
    speaker_regex: str | None = None,
    classes: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Manifest rows of every audio file below a label folder."""
    root = require_dir(root, "folder-per-class corpus", EXPECTED)
    name = corpus_name or root.name
    pattern = _compile(speaker_regex)
    allowed = {canonical(c) for c in classes} if classes is not None else None
    skips = Skips()
    rows = []
    for path in walk_files(root, skips):
        below = path.relative_to(root)
        if len(below.parts) < 2:
            skips.add("files outside a label folder", path)
            continue
        if not is_audio(path):
            skips.add("non-audio files", path)
            continue
        label = canonical(below.parts[0])
        if allowed is not None and label not in allowed:
            skips.add("files in folders that are not classes", path)
            continue
        rows.append(
            make_row(
                utt_id=utt_id_for(name, root, path),
                path=path,
                label=label,
                speaker=f"{name}/{_speaker(pattern, below.as_posix())}",
                corpus=name,
            )
        )
    return finish(
        rows,
        corpus=name,
        root=root,
        skips=skips,
        expected=EXPECTED,
        title="folder-per-class corpus",
    )


def _compile(speaker_regex: str | None) -> re.Pattern[str] | None:
    if speaker_regex is None:
        return None
    try:
        return re.compile(speaker_regex)
    except re.error as exc:
        raise ConfigError(
            f"corpus.options.speaker_regex {speaker_regex!r} is invalid: {exc}"
        ) from exc


def _speaker(pattern: re.Pattern[str] | None, below: str) -> str:
    match = pattern.search(below) if pattern is not None else None
    if match is None:
        return "unknown"
    if "speaker" in match.re.groupindex:
        return match.group("speaker")
    return match.group(1) if match.re.groups else match.group(0)

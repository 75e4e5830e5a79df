"""Builders of tiny corpus trees in each corpus's exact on-disk layout, with real 16-bit WAVs.

Every builder writes into the folder it is given and returns the root to pass to the loader.
Each tree includes the decoys seen in real copies (macOS ``._*`` files, per-annotator folders,
non-audio files, song files, duplicate nested copies) so tests can check they are skipped.
"""

from __future__ import annotations

import csv
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf

SECONDS = 0.3
APPLEDOUBLE_BYTES = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        "


def write_wav(path: Path, sample_rate: int, *, silent: bool = False) -> Path:
    """0.3 s of 16-bit PCM noise (seeded by the file name, so trees are reproducible)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(path.name.encode()))
    n = int(SECONDS * sample_rate)
    signal = np.zeros(n) if silent else 0.1 * rng.standard_normal(n)
    sf.write(path, signal.astype(np.float32), sample_rate, subtype="PCM_16")
    return path


def write_appledouble(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(APPLEDOUBLE_BYTES + b"\x00" * 64)
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, quoting=csv.QUOTE_MINIMAL)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --- IEMOCAP -------------------------------------------------------------------------------------
IEMOCAP_RATE = 16000
IEMOCAP_HEADER = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"


def _iemocap_block(start: float, utt: str, code: str, rater_lines: list[str]) -> str:
    summary = f"[{start:.4f} - {start + 2:.4f}]\t{utt}\t{code}\t[2.5000, 2.5000, 2.5000]"
    return "\n".join([summary, *rater_lines]) + "\n\n"


# Session 1, dialog Ses01F_impro01: utt suffix -> (consensus code, categorical rater lines).
IEMOCAP_SESSION1 = {
    "F000": (
        "neu",
        [
            "C-E2:\tNeutral;\t()",
            "C-E3:\tNeutral;\t()",
            "C-E4:\tNeutral;\t()",
            "C-F1:\tNeutral;\t(curious)",
        ],
    ),
    "M001": (
        "exc",
        [
            "C-E1:\tExcited;\t()",
            "C-E2:\tHappiness;\t()",
            "C-E3:\tExcited;\t()",
            "C-M1:\tExcited;\t()",
        ],
    ),
    "F002": (
        "fru",
        [
            "C-E2:\tNeutral; Frustration;\t()",
            "C-E3:\tFrustration;\t()",
            "C-E4:\tAnger;\t(annoyed, attitude)",
        ],
    ),
    "M003": ("xxx", ["C-E1:\tAnger;\t()", "C-E2:\tSadness;\t()", "C-E3:\tNeutral;\t()"]),
    "F004": ("hap", ["C-E1:\tHappiness;\t()", "C-E2:\tHappiness;\t()", "C-E4:\tOther:amused;\t()"]),
    "M005": (
        "ang",
        [
            "C-E1:\tAnger;\t()",
            "C-E3:\tAnger;\t()",
            "C-E4:\tAnger;\t()",
            "A-E3:\tval 2; act 4; dom  4;\t()",
            "A-M1:\tval 1; act 5; dom  5;\t()",
        ],
    ),
    # Labeled, but its WAV is absent from the tree: the loader must skip it.
    "F006": ("sad", ["C-E1:\tSadness;\t()", "C-E2:\tSadness;\t()", "C-E3:\tSadness;\t()"]),
}
# Session 2, dialog Ses02M_script01_1: the *female* actor says F000 although the dialog prefix is M.
IEMOCAP_SESSION2 = {
    "F000": ("ang", ["C-E1:\tAnger;\t()", "C-E2:\tAnger;\t()", "C-E3:\tFrustration;\t()"]),
    "M001": ("sad", ["C-E1:\tSadness;\t()", "C-E4:\tSadness;\t()", "C-E5:\tNeutral;\t()"]),
}


def _iemocap_dialog(root: Path, session: int, dialog: str, blocks: dict, missing: set[str]) -> None:
    session_dir = root / f"Session{session}"
    text = IEMOCAP_HEADER
    for i, (suffix, (code, raters)) in enumerate(blocks.items()):
        utt = f"{dialog}_{suffix}"
        text += _iemocap_block(3.0 * i + 1.0, utt, code, raters)
        if suffix not in missing:
            write_wav(session_dir / "sentences" / "wav" / dialog / f"{utt}.wav", IEMOCAP_RATE)
    write_text(session_dir / "dialog" / "EmoEvaluation" / f"{dialog}.txt", text)
    write_text(
        session_dir / "dialog" / "transcriptions" / f"{dialog}.txt",
        f"{dialog}_F000 [001.0000-003.0000]: Excuse me.\n{dialog}_MXX0 [004.0-005.0]: Hm.\n",
    )


def build_iemocap(base: Path) -> Path:
    """Two sessions; decoys: Categorical/ per-annotator .txt, a ``._`` copy, a .pk in a wav folder.

    Expected rows (default options): Session1 F000 neutral, M001 excited, F002 frustrated,
    F004 happy, M005 angry (M003 is xxx, F006 has no WAV); Session2 F000 angry, M001 sad.
    """
    root = base / "IEMOCAP_full_release"
    _iemocap_dialog(root, 1, "Ses01F_impro01", IEMOCAP_SESSION1, missing={"F006"})
    _iemocap_dialog(root, 2, "Ses02M_script01_1", IEMOCAP_SESSION2, missing=set())
    eval_dir = root / "Session1" / "dialog" / "EmoEvaluation"
    # Decoys that would add a phantom utterance F099 if they were parsed (its WAV exists).
    decoy_block = _iemocap_block(90.0, "Ses01F_impro01_F099", "sad", ["C-E1:\tSadness;\t()"])
    write_text(eval_dir / "Categorical" / "Ses01F_impro01_e2_cat.txt", IEMOCAP_HEADER + decoy_block)
    write_text(eval_dir / "Attribute" / "Ses01F_impro01_e3_atr.txt", decoy_block)
    write_text(eval_dir / "Self-evaluation" / "Ses01F_impro01.txt", decoy_block)
    (eval_dir / "._Ses01F_impro01.txt").write_bytes(APPLEDOUBLE_BYTES + decoy_block.encode())
    write_text(eval_dir / "notes.csv", decoy_block)
    write_wav(root / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F099.wav", IEMOCAP_RATE)
    write_text(root / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01.pk", "pickle")
    write_appledouble(root / "Session1/sentences/wav/Ses01F_impro01/._Ses01F_impro01_F000.wav")
    write_text(root / "README.txt", "IEMOCAP fixture")
    return root


# --- SAVEE ---------------------------------------------------------------------------------------
SAVEE_RATE = 44100
SAVEE_STEMS = ("a01", "sa01", "su01", "n01")


def build_savee(base: Path) -> Path:
    """``AudioData/{DC,JE}/{a01,sa01,su01,n01}.wav`` plus a nested duplicate and decoys."""
    root = base / "SAVEE"
    for speaker in ("DC", "JE"):
        for stem in SAVEE_STEMS:
            write_wav(root / "AudioData" / speaker / f"{stem}.wav", SAVEE_RATE)
    write_wav(root / "AudioData" / "AudioData" / "DC" / "a01.wav", SAVEE_RATE)  # nested duplicate
    write_appledouble(root / "AudioData" / "DC" / "._a01.wav")
    write_text(root / "AudioData" / "Info.txt", "Surrey Audio-Visual Expressed Emotion")
    write_wav(root / "AudioData" / "DC" / "s01.wav", SAVEE_RATE)  # no bare "s" code
    write_wav(root / "AudioData" / "XX" / "a01.wav", SAVEE_RATE)  # not a SAVEE speaker
    return root


def build_savee_flat(base: Path) -> Path:
    """The Kaggle layout: ``ALL/<speaker>_<code><NN>.wav``."""
    root = base / "savee_kaggle"
    for name in ("DC_a01", "JE_sa02", "KL_su15", "JK_n30"):
        write_wav(root / "ALL" / f"{name}.wav", SAVEE_RATE)
    write_appledouble(root / "ALL" / "._DC_a01.wav")
    write_text(root / "ALL" / "DC_a01.txt", "not audio")
    return root


# --- RAVDESS -------------------------------------------------------------------------------------
RAVDESS_RATE = 48000


def build_ravdess(base: Path) -> Path:
    """Two actors' speech files, a song file, a Kaggle-style duplicate tree and decoys."""
    root = base / "ravdess"
    write_wav(root / "Actor_01" / "03-01-01-01-01-01-01.wav", RAVDESS_RATE)  # male, neutral
    write_wav(root / "Actor_01" / "03-01-08-02-01-02-01.wav", RAVDESS_RATE)  # male, surprised
    write_wav(root / "Actor_02" / "03-01-05-02-02-02-02.wav", RAVDESS_RATE)  # female, angry
    write_wav(root / "Actor_02" / "03-01-02-01-01-01-02.wav", RAVDESS_RATE)  # female, calm
    write_wav(root / "Actor_01" / "03-02-03-01-01-01-01.wav", RAVDESS_RATE)  # song: filtered
    duplicate = root / "audio_speech_actors_01-24" / "Actor_01" / "03-01-01-01-01-01-01.wav"
    write_wav(duplicate, RAVDESS_RATE)
    write_appledouble(root / "Actor_01" / "._03-01-01-01-01-01-01.wav")
    write_text(root / "Actor_02" / "notes.txt", "decoy")
    write_wav(root / "Actor_02" / "03-01-09-01-01-01-02.wav", RAVDESS_RATE)  # emotion 09: invalid
    return root


# --- CREMA-D -------------------------------------------------------------------------------------
CREMAD_RATE = 16000
CREMAD_CLIPS = ("1001_DFA_ANG_XX", "1001_IEO_HAP_HI", "1002_TIE_NEU_XX", "1076_MTI_SAD_XX")
CREMAD_VOTE_HEADER = [
    "",
    "A",
    "D",
    "F",
    "H",
    "N",
    "S",
    "fileName",
    "numResponses",
    "agreement",
    "emoVote",
    "meanEmoResp",
    "meanAngerResp",
]


def build_cremad(base: Path, *, with_metadata: bool = True) -> Path:
    """Four clips (one silent), demographics, voice/face/AV vote rows with an N:S tie."""
    root = base / "CREMA-D"
    for clip in CREMAD_CLIPS:
        write_wav(root / "AudioWAV" / f"{clip}.wav", CREMAD_RATE, silent=clip == "1076_MTI_SAD_XX")
    write_appledouble(root / "AudioWAV" / "._1001_DFA_ANG_XX.wav")
    write_text(root / "AudioWAV" / "desktop.ini", "decoy")
    write_text(root / "AudioMP3" / "1001_DFA_ANG_XX.mp3", "mp3 decoy")
    if not with_metadata:
        return root
    write_csv(
        root / "VideoDemographics.csv",
        ["ActorID", "Age", "Sex", "Race", "Ethnicity"],
        [
            [1001, 51, "Male", "Caucasian", "Not Hispanic"],
            [1002, 21, "Female", "Caucasian", "Not Hispanic"],
            [1076, 25, "Female", "African American", "Not Hispanic"],
        ],
    )
    write_csv(
        root / "processedResults" / "tabulatedVotes.csv",
        CREMAD_VOTE_HEADER,
        [
            # voice-only (1xxxxx): A=2, N=1
            [100001, 2, 0, 0, 0, 1, 0, "1001_DFA_ANG_XX", 3, 0.67, "A", 60, 60],
            # audio-visual (3xxxxx) for the same clip: must not be used
            [300001, 5, 0, 0, 0, 0, 0, "1001_DFA_ANG_XX", 5, 1.0, "A", 70, 70],
            # voice-only tie N:S
            [100002, 0, 0, 0, 1, 2, 2, "1001_IEO_HAP_HI", 5, 0.4, "N:S", 50, -1],
            # face-only (2xxxxx) for a clip with no voice row: no votes
            [200003, 0, 0, 0, 0, 4, 0, "1002_TIE_NEU_XX", 4, 1.0, "N", 50, -1],
        ],
    )
    return root


# --- EmoDB ---------------------------------------------------------------------------------------
EMODB_RATE = 16000


def build_emodb(base: Path) -> Path:
    root = base / "emodb"
    for name in ("03a01Fa", "08a02Wb", "16b10Tc", "11b03La", "13a05Ab"):
        write_wav(root / "wav" / f"{name}.wav", EMODB_RATE)
    write_appledouble(root / "wav" / "._03a01Fa.wav")
    write_text(root / "wav" / "readme.txt", "decoy")
    write_wav(root / "wav" / "03a01Xa.wav", EMODB_RATE)  # X is not an emotion letter
    write_text(root / "silb" / "03a01Fa.silb", "syllables")
    write_text(root / "lablaut" / "03a01Fa.lab", "phones")
    return root


# --- MSP-Podcast ---------------------------------------------------------------------------------
MSP_RATE = 16000
MSP_HEADER = ["FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set"]
MSP_ROWS = [
    ["MSP-PODCAST_0001_0008.wav", "N", 2.2, 4.0, 2.6, "30", "Male", "Test1"],
    ["MSP-PODCAST_0002_0001.wav", "A", 5.0, 2.0, 5.2, "12", "Female", "Train"],
    ["MSP-PODCAST_0002_0002.wav", "H", 4.4, 6.0, 4.0, "12", "Female", "Train"],
    ["MSP-PODCAST_0003_0001.wav", "C", 3.0, 3.0, 4.0, "Unknown", "Unknown", "Development"],
    ["MSP-PODCAST_0003_0002.wav", "X", 3.0, 4.0, 4.0, "Unknown", "Unknown", "Train"],
    ["MSP-PODCAST_0004_0001.wav", "H", 4.0, 5.0, 4.0, "Unknown", "Female", "Test2"],
    ["MSP-PODCAST_1909_1017.wav", "N", 4.0, 4.0, 4.0, "99", "Male", "Train"],  # no audio
]


def build_msp_podcast(base: Path, *, old_names: bool = False) -> Path:
    """Consensus labels + audio; ``old_names`` uses label/labels_concensus.csv and Audio/."""
    root = base / "MSP-Podcast"
    labels = "label/labels_concensus.csv" if old_names else "Labels/labels_consensus.csv"
    audio = root / ("Audio" if old_names else "Audios")
    write_csv(root / labels, MSP_HEADER, MSP_ROWS)
    for row in MSP_ROWS:
        if row[0] != "MSP-PODCAST_1909_1017.wav":
            write_wav(audio / row[0], MSP_RATE)
    write_appledouble(audio / "._MSP-PODCAST_0001_0008.wav")
    write_text(root / "Transcripts" / "MSP-PODCAST_0001_0008.txt", "hello")
    return root


# --- generic CSV and folder-per-class ------------------------------------------------------------
def build_generic_csv(base: Path) -> tuple[Path, Path]:
    """``mycorpus/labels.csv`` with relative, nested and absolute paths; returns (root, outside)."""
    root = base / "mycorpus"
    write_wav(root / "audio" / "a.wav", 16000)
    write_wav(root / "audio" / "sub" / "b.wav", 16000)
    write_wav(root / "c.flac", 16000)
    outside = write_wav(base / "elsewhere" / "d.wav", 16000)
    write_csv(
        root / "labels.csv",
        ["path", "label", "speaker", "session", "gender", "split", "votes"],
        [
            ["audio/sub/b.wav", "Anger", "s2", "", "female", "test", "angry;Anger;neutral"],
            ["audio/a.wav", "happy", "s1", "day1", "M", "train", ""],
            ["c.flac", "", "", "", "", "", ""],
            [str(outside), "sad", "s3", "", "F", "val", ""],
        ],
    )
    return root, outside


def build_folders(base: Path) -> Path:
    """``toy/<Label>/...`` with synonyms, nested folders, FLAC/OGG and decoys."""
    root = base / "toy"
    write_wav(root / "Angry" / "spk1_001.wav", 16000)
    write_wav(root / "anger" / "spk2_002.wav", 16000)
    write_wav(root / "Neutral" / "spk1_003.wav", 16000)
    path = root / "sad" / "session1" / "spk2_004.flac"
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.zeros(1600, dtype=np.float32), 16000, subtype="PCM_16")
    write_wav(root / "extras" / "spk3_005.wav", 16000)
    write_text(root / "Angry" / "readme.md", "decoy")
    write_appledouble(root / "Angry" / "._spk1_001.wav")
    write_wav(root / "loose.wav", 16000)  # not inside a label folder
    write_appledouble(root / "__MACOSX" / "Angry" / "._spk1_001.wav")
    return root

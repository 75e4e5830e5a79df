"""Each corpus loader on a sample copied verbatim from that corpus's published documentation.

The fixture trees of ``corpus_fixtures`` are built to the documented layouts, but their contents
are ours. Here each loader reads text and file names exactly as the corpus's own description
prints them (quoted in ``shared/docs/ser-corpora-and-anchors.md`` section 3, with the source named
beside each sample), so a parser that only works on our own fixtures fails.
"""

from __future__ import annotations

from pathlib import Path

import corpus_fixtures as fx

from after_ray.data.corpora import load_corpus
from after_ray.data.corpora.iemocap import parse_emo_evaluation

# IEMOCAP release, EmoEvaluation/<dialog>.txt: the first block of Ses01F_impro01, as the release
# prints it (tabs, the double space in "dom  2", free-text comments with commas).
IEMOCAP_EMO_EVALUATION = (
    "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n"
    "\n"
    "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]\n"
    "C-E2:\tNeutral;\t()\n"
    "C-E3:\tNeutral;\t()\n"
    "C-E4:\tNeutral;\t()\n"
    "C-F1:\tNeutral;\t(curious)\n"
    "A-E3:\tval 3; act 2; dom  2;\t()\n"
    "A-E4:\tval 2; act 3; dom  3;\t(mildly aggravated but staying polite, attitude)\n"
    "A-F1:\tval 3; act 2; dom  1;\t()\n"
    "\n"
)
# IEMOCAP dialog/transcriptions/<dialog>.txt line format, as in the release.
IEMOCAP_TRANSCRIPT = "Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.\n"

# MSP-Podcast Labels/labels_consensus.csv: the header and first sample row of the release.
MSP_CONSENSUS = (
    "FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set\n"
    "MSP-PODCAST_0001_0008.wav,N,2.2,4.0,2.6,30,Male,Test1\n"
)


def test_iemocap_reads_the_release_block_verbatim(tmp_path):
    root = tmp_path / "IEMOCAP_full_release"
    session = root / "Session1"
    fx.write_text(session / "dialog/EmoEvaluation/Ses01F_impro01.txt", IEMOCAP_EMO_EVALUATION)
    fx.write_text(session / "dialog/transcriptions/Ses01F_impro01.txt", IEMOCAP_TRANSCRIPT)
    wav = fx.write_wav(session / "sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav", 16000)

    assert parse_emo_evaluation(session / "dialog/EmoEvaluation/Ses01F_impro01.txt") == [
        ("Ses01F_impro01_F000", "neu", ["neutral", "neutral", "neutral"])  # C-F1 is self-rating
    ]
    (row,) = load_corpus("iemocap", root)
    assert row == {
        "utt_id": "iemocap/Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000",
        "path": str(wav),
        "label": "neutral",
        "votes": ["neutral", "neutral", "neutral"],
        "speaker": "iemocap/Ses01F",
        "session": "Session1",
        "gender": "F",
        "corpus": "iemocap",
        "split": None,
    }


def test_msp_podcast_reads_the_release_consensus_rows_verbatim(tmp_path):
    root = tmp_path / "MSP-Podcast"
    fx.write_text(root / "Labels" / "labels_consensus.csv", MSP_CONSENSUS)
    wav = fx.write_wav(root / "Audios" / "MSP-PODCAST_0001_0008.wav", 16000)
    (row,) = load_corpus("msp_podcast", root)
    assert (row["utt_id"], row["path"], row["label"]) == (
        "msp_podcast/Audios/MSP-PODCAST_0001_0008",
        str(wav),
        "neutral",  # EmoClass N
    )
    assert (row["speaker"], row["gender"], row["split"]) == ("msp_podcast/30", "M", "test")


def test_ravdess_reads_its_documented_filename_example(tmp_path):
    # RAVDESS README (Livingstone & Russo 2018): "03-01-06-01-02-01-12" = audio-only, speech,
    # fearful, normal intensity, statement "dogs", 1st repetition, 12th actor (female: even).
    root = tmp_path / "Audio_Speech_Actors_01-24"
    wav = fx.write_wav(root / "Actor_12" / "03-01-06-01-02-01-12.wav", 48000)
    (row,) = load_corpus("ravdess", root)
    assert (row["path"], row["label"], row["speaker"], row["gender"]) == (
        str(wav),
        "fear",
        "ravdess/12",
        "F",
    )


def test_cremad_reads_its_documented_filename_example(tmp_path):
    # CREMA-D README: "1001_DFA_ANG_XX.wav" = actor 1001, sentence "Don't forget a jacket",
    # anger, unspecified level. VideoDemographics.csv columns as published.
    root = tmp_path / "CREMA-D"
    wav = fx.write_wav(root / "AudioWAV" / "1001_DFA_ANG_XX.wav", 16000)
    fx.write_text(
        root / "VideoDemographics.csv",
        "ActorID,Age,Sex,Race,Ethnicity\n1001,51,Male,Caucasian,Not Hispanic\n",
    )
    (row,) = load_corpus("cremad", root)
    assert (row["path"], row["label"], row["speaker"], row["gender"]) == (
        str(wav),
        "angry",
        "cremad/1001",
        "M",
    )


def test_emodb_reads_its_documented_filename_example(tmp_path):
    # EmoDB documentation: "03a01Fa.wav" = speaker 03 (male), text a01, F = Freude (happiness),
    # version a.
    wav = fx.write_wav(tmp_path / "emodb" / "wav" / "03a01Fa.wav", 16000)
    (row,) = load_corpus("emodb", tmp_path / "emodb")
    assert (row["path"], row["label"], row["speaker"], row["gender"]) == (
        str(wav),
        "happy",
        "emodb/03",
        "M",
    )


def test_savee_reads_its_documented_layout(tmp_path):
    # SAVEE documentation: AudioData/<speaker>/<code><NN>.wav; "sa" = sadness, "su" = surprise.
    root = tmp_path / "SAVEE"
    sad = fx.write_wav(root / "AudioData" / "KL" / "sa03.wav", 44100)
    surprise = fx.write_wav(root / "AudioData" / "KL" / "su15.wav", 44100)
    rows = {Path(r["path"]): r for r in load_corpus("savee", root)}
    assert {p: (r["label"], r["speaker"], r["gender"]) for p, r in rows.items()} == {
        sad: ("sad", "savee/KL", "M"),
        surprise: ("surprise", "savee/KL", "M"),
    }

"""Corpus loaders on fixture trees in each corpus's exact layout, label maps and merging."""

from __future__ import annotations

import logging
from pathlib import Path

import corpus_fixtures as fx
import pytest
import soundfile as sf

from after_ray.data.corpora import LOADERS, load_corpus
from after_ray.data.corpora.iemocap import parse_emo_evaluation
from after_ray.data.corpora.labels import (
    CANONICAL,
    FOUR_CLASS,
    apply_label_map,
    canonical,
    resolve_label_map,
)
from after_ray.data.corpora.merge import class_counts, format_class_counts, merge_corpora
from after_ray.errors import ConfigError, CorpusError

ROW_KEYS = {"utt_id", "path", "label", "votes", "speaker", "session", "gender", "corpus", "split"}


def by_id(rows):
    return {r["utt_id"]: r for r in rows}


def check_contract(rows, corpus, *, canonical_labels=True):
    """What every loader promises, whatever the corpus."""
    assert rows, "no rows"
    ids = [r["utt_id"] for r in rows]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    for row in rows:
        assert set(row) == ROW_KEYS
        assert row["corpus"] == corpus
        assert row["utt_id"].startswith(f"{corpus}/")
        assert row["speaker"].startswith(f"{corpus}/")
        assert Path(row["path"]).is_absolute() and Path(row["path"]).is_file()
        assert not Path(row["path"]).name.startswith("._")
        if canonical_labels:
            assert row["label"] is None or row["label"] in CANONICAL
        assert row["votes"] is None or (row["votes"] and set(row["votes"]) <= set(CANONICAL))
        assert row["gender"] in (None, "F", "M")
        assert row["split"] in (None, "train", "val", "test")


# --- IEMOCAP --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def iemocap_root(tmp_path_factory):
    return fx.build_iemocap(tmp_path_factory.mktemp("iemocap"))


def test_iemocap_rows_labels_votes_speakers(iemocap_root):
    rows = load_corpus("iemocap", iemocap_root)
    check_contract(rows, "iemocap")
    got = {r["utt_id"].rsplit("/", 1)[1]: r for r in rows}
    assert set(got) == {
        "Ses01F_impro01_F000", "Ses01F_impro01_M001", "Ses01F_impro01_F002",
        "Ses01F_impro01_F004", "Ses01F_impro01_M005",
        "Ses02M_script01_1_F000", "Ses02M_script01_1_M001",
    }  # fmt: skip
    assert {k: r["label"] for k, r in got.items()} == {
        "Ses01F_impro01_F000": "neutral",
        "Ses01F_impro01_M001": "excited",
        "Ses01F_impro01_F002": "frustrated",
        "Ses01F_impro01_F004": "happy",
        "Ses01F_impro01_M005": "angry",
        "Ses02M_script01_1_F000": "angry",
        "Ses02M_script01_1_M001": "sad",
    }
    # External raters only (C-F1 / C-M1 self-evaluations excluded); a multi-category line
    # contributes each category; words outside the list count as "other".
    assert got["Ses01F_impro01_F000"]["votes"] == ["neutral"] * 3
    assert got["Ses01F_impro01_M001"]["votes"] == ["excited", "happy", "excited"]
    assert got["Ses01F_impro01_F002"]["votes"] == ["neutral", "frustrated", "frustrated", "angry"]
    assert got["Ses01F_impro01_F004"]["votes"] == ["happy", "happy", "other"]
    assert got["Ses01F_impro01_M005"]["votes"] == ["angry"] * 3
    # The utterance speaker, not the dialog prefix: Ses01F_impro01_M001 is the male actor, and
    # Ses02M_script01_1_F000 the female actor.
    assert got["Ses01F_impro01_M001"]["speaker"] == "iemocap/Ses01M"
    assert got["Ses01F_impro01_M001"]["gender"] == "M"
    assert got["Ses01F_impro01_F000"]["speaker"] == "iemocap/Ses01F"
    assert got["Ses02M_script01_1_F000"]["speaker"] == "iemocap/Ses02F"
    assert got["Ses02M_script01_1_F000"]["gender"] == "F"
    assert got["Ses02M_script01_1_M001"]["speaker"] == "iemocap/Ses02M"
    assert {r["session"] for r in rows} == {"Session1", "Session2"}
    assert got["Ses02M_script01_1_M001"]["session"] == "Session2"
    assert all(r["split"] is None for r in rows)
    f000 = got["Ses01F_impro01_F000"]
    assert f000["utt_id"] == "iemocap/Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000"
    assert f000["path"] == str(
        iemocap_root / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_F000.wav"
    )
    assert sf.info(f000["path"]).samplerate == 16000


def test_iemocap_skips_decoys_missing_wavs_and_no_agreement_with_counts(iemocap_root, caplog):
    with caplog.at_level(logging.INFO, logger="after_ray.data.corpora"):
        rows = load_corpus("iemocap", iemocap_root)
    ids = " ".join(r["utt_id"] for r in rows)
    assert "F099" not in ids  # only in Categorical/, Attribute/, Self-evaluation/ and ._ decoys
    assert "M003" not in ids  # xxx
    assert "F006" not in ids  # WAV missing
    summary = [r.getMessage() for r in caplog.records if "7 utterances" in r.getMessage()]
    assert summary, caplog.text
    assert "1 labeled utterances without a WAV" in summary[0]
    assert "1 no-agreement (xxx) utterances" in summary[0]
    assert "1 AppleDouble ._ files" in summary[0]
    assert "Ses01F_impro01_F006" in caplog.text  # the missing WAV is named


def test_iemocap_keep_no_agreement_gives_unlabeled_row_with_votes(iemocap_root):
    rows = by_id(load_corpus("iemocap", iemocap_root, keep_no_agreement=True))
    assert len(rows) == 8
    xxx = rows["iemocap/Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_M003"]
    assert xxx["label"] is None
    assert xxx["votes"] == ["angry", "sad", "neutral"]


def test_iemocap_parser_reads_blocks_in_file_order(iemocap_root):
    path = iemocap_root / "Session1/dialog/EmoEvaluation/Ses01F_impro01.txt"
    blocks = parse_emo_evaluation(path)
    assert [b[0][-4:] for b in blocks] == list(fx.IEMOCAP_SESSION1)
    assert [b[1] for b in blocks] == [code for code, _ in fx.IEMOCAP_SESSION1.values()]


def test_iemocap_four_class_map_merges_excited_and_drops_frustrated(iemocap_root):
    rows = apply_label_map(load_corpus("iemocap", iemocap_root), FOUR_CLASS)
    got = {r["utt_id"].rsplit("/", 1)[1]: r for r in rows}
    assert "Ses01F_impro01_F002" not in got  # fru is not one of the four classes
    assert got["Ses01F_impro01_M001"]["label"] == "happy"  # exc -> happy
    assert got["Ses01F_impro01_M001"]["votes"] == ["happy", "happy", "happy"]
    assert {r["label"] for r in rows} == {"neutral", "happy", "angry", "sad"}
    assert len(rows) == 6


def test_iemocap_missing_root_and_empty_root_name_what_is_expected(tmp_path):
    with pytest.raises(CorpusError, match="IEMOCAP root .* does not exist.*IEMOCAP_full_release"):
        load_corpus("iemocap", tmp_path / "nope")
    (tmp_path / "Session1").mkdir()
    with pytest.raises(CorpusError, match=r"no Session\*/dialog/EmoEvaluation/\*\.txt"):
        load_corpus("iemocap", tmp_path)


def test_iemocap_root_may_be_the_folder_above_the_release(iemocap_root):
    assert load_corpus("iemocap", iemocap_root.parent) == load_corpus("iemocap", iemocap_root)


# --- SAVEE ----------------------------------------------------------------------------------------
def test_savee_original_layout_two_letter_codes_and_nested_duplicate(tmp_path):
    root = fx.build_savee(tmp_path)
    rows = load_corpus("savee", root)
    check_contract(rows, "savee")
    got = {r["utt_id"]: r for r in rows}
    assert len(rows) == 8  # 2 speakers x 4 files; the AudioData/AudioData copy is not counted
    assert got["savee/AudioData/DC/sa01"]["label"] == "sad"
    assert got["savee/AudioData/DC/su01"]["label"] == "surprise"
    assert got["savee/AudioData/JE/a01"]["label"] == "angry"
    assert got["savee/AudioData/JE/n01"]["label"] == "neutral"
    assert not any("AudioData/AudioData" in r["path"] for r in rows)
    assert not any(r["utt_id"].endswith(("/s01", "XX/a01")) for r in rows)
    assert {r["speaker"] for r in rows} == {"savee/DC", "savee/JE"}
    assert {r["gender"] for r in rows} == {"M"}
    assert sf.info(rows[0]["path"]).samplerate == 44100


def test_savee_flat_layout(tmp_path):
    rows = load_corpus("savee", fx.build_savee_flat(tmp_path))
    check_contract(rows, "savee")
    assert {r["utt_id"]: (r["label"], r["speaker"]) for r in rows} == {
        "savee/ALL/DC_a01": ("angry", "savee/DC"),
        "savee/ALL/JE_sa02": ("sad", "savee/JE"),
        "savee/ALL/KL_su15": ("surprise", "savee/KL"),
        "savee/ALL/JK_n30": ("neutral", "savee/JK"),
    }


def test_savee_missing_root(tmp_path):
    with pytest.raises(CorpusError, match="SAVEE root .* does not exist.*AudioData"):
        load_corpus("savee", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="SAVEE root .* no usable utterances"):
        load_corpus("savee", tmp_path / "empty")


# --- RAVDESS --------------------------------------------------------------------------------------
def test_ravdess_speech_only_genders_and_kaggle_duplicates(tmp_path):
    root = fx.build_ravdess(tmp_path)
    rows = load_corpus("ravdess", root)
    check_contract(rows, "ravdess")
    assert {r["utt_id"]: (r["label"], r["speaker"], r["gender"]) for r in rows} == {
        "ravdess/Actor_01/03-01-01-01-01-01-01": ("neutral", "ravdess/01", "M"),
        "ravdess/Actor_01/03-01-08-02-01-02-01": ("surprise", "ravdess/01", "M"),
        "ravdess/Actor_02/03-01-05-02-02-02-02": ("angry", "ravdess/02", "F"),
        "ravdess/Actor_02/03-01-02-01-01-01-02": ("calm", "ravdess/02", "F"),
    }
    assert sf.info(rows[0]["path"]).samplerate == 48000


def test_ravdess_include_song(tmp_path):
    rows = load_corpus("ravdess", fx.build_ravdess(tmp_path), include_song=True)
    song = [r for r in rows if Path(r["path"]).name.startswith("03-02-")]
    assert len(rows) == 5 and len(song) == 1
    assert song[0]["label"] == "happy" and song[0]["speaker"] == "ravdess/01"


def test_ravdess_missing_root(tmp_path):
    with pytest.raises(CorpusError, match="RAVDESS root .* does not exist.*Actor_XX"):
        load_corpus("ravdess", tmp_path / "nope")


# --- CREMA-D --------------------------------------------------------------------------------------
def test_cremad_labels_genders_and_voice_only_votes(tmp_path):
    root = fx.build_cremad(tmp_path)
    rows = load_corpus("cremad", root)
    check_contract(rows, "cremad")
    got = {r["utt_id"]: r for r in rows}
    assert set(got) == {f"cremad/AudioWAV/{c}" for c in fx.CREMAD_CLIPS}
    ang = got["cremad/AudioWAV/1001_DFA_ANG_XX"]
    assert ang["label"] == "angry"  # the acted emotion
    assert ang["votes"] == ["angry", "angry", "neutral"]  # voice row, not the AV row
    hap = got["cremad/AudioWAV/1001_IEO_HAP_HI"]
    assert hap["label"] == "happy"
    assert hap["votes"] == ["happy", "neutral", "neutral", "sad", "sad"]  # perceived: an N:S tie
    assert got["cremad/AudioWAV/1002_TIE_NEU_XX"]["votes"] is None  # face-only row ignored
    assert got["cremad/AudioWAV/1076_MTI_SAD_XX"]["label"] == "sad"  # silent, but kept here
    assert {r["speaker"]: r["gender"] for r in rows} == {
        "cremad/1001": "M",
        "cremad/1002": "F",
        "cremad/1076": "F",
    }


def test_cremad_without_metadata_files(tmp_path):
    rows = load_corpus("cremad", fx.build_cremad(tmp_path, with_metadata=False))
    assert len(rows) == 4
    assert all(r["votes"] is None and r["gender"] is None for r in rows)


def test_cremad_missing_root(tmp_path):
    with pytest.raises(CorpusError, match="CREMA-D root .* does not exist.*AudioWAV"):
        load_corpus("cremad", tmp_path / "nope")


# --- EmoDB ----------------------------------------------------------------------------------------
def test_emodb_german_letters_and_genders(tmp_path):
    rows = load_corpus("emodb", fx.build_emodb(tmp_path))
    check_contract(rows, "emodb")
    assert {r["utt_id"]: (r["label"], r["speaker"], r["gender"]) for r in rows} == {
        "emodb/wav/03a01Fa": ("happy", "emodb/03", "M"),
        "emodb/wav/08a02Wb": ("angry", "emodb/08", "F"),  # W = Wut = anger, not happy
        "emodb/wav/16b10Tc": ("sad", "emodb/16", "F"),
        "emodb/wav/11b03La": ("boredom", "emodb/11", "M"),
        "emodb/wav/13a05Ab": ("fear", "emodb/13", "F"),  # A = Angst = fear
    }


def test_emodb_missing_root(tmp_path):
    with pytest.raises(CorpusError, match="EmoDB root .* does not exist.*wav/"):
        load_corpus("emodb", tmp_path / "nope")


# --- MSP-Podcast ----------------------------------------------------------------------------------
@pytest.mark.parametrize("old_names", [False, True])
def test_msp_podcast_labels_splits_speakers(tmp_path, caplog, old_names):
    root = fx.build_msp_podcast(tmp_path, old_names=old_names)
    with caplog.at_level(logging.INFO, logger="after_ray.data.corpora"):
        rows = load_corpus("msp_podcast", root)
    check_contract(rows, "msp_podcast")
    got = {Path(r["path"]).stem: r for r in rows}
    expect = {
        "MSP-PODCAST_0001_0008": ("neutral", "test", "msp_podcast/30", "M"),
        "MSP-PODCAST_0002_0001": ("angry", "train", "msp_podcast/12", "F"),
        "MSP-PODCAST_0002_0002": ("happy", "train", "msp_podcast/12", "F"),
        "MSP-PODCAST_0003_0001": (
            "contempt", "val", "msp_podcast/unknown-MSP-PODCAST_0003_0001", None,
        ),
        "MSP-PODCAST_0004_0001": (
            "happy", "test", "msp_podcast/unknown-MSP-PODCAST_0004_0001", "F",
        ),
    }  # fmt: skip
    assert {
        k: (r["label"], r["split"], r["speaker"], r["gender"]) for k, r in got.items()
    } == expect
    audio = "Audio" if old_names else "Audios"
    assert got["MSP-PODCAST_0001_0008"]["utt_id"] == f"msp_podcast/{audio}/MSP-PODCAST_0001_0008"
    assert "MSP-PODCAST_1909_1017.wav" in caplog.text  # missing audio is logged by name


def test_msp_podcast_keep_no_agreement(tmp_path):
    rows = load_corpus("msp_podcast", fx.build_msp_podcast(tmp_path), keep_no_agreement=True)
    x = [r for r in rows if r["utt_id"].endswith("0003_0002")]
    assert len(rows) == 6 and x[0]["label"] is None and x[0]["split"] == "train"


def test_msp_podcast_missing_label_file(tmp_path):
    (tmp_path / "msp" / "Audios").mkdir(parents=True)
    with pytest.raises(CorpusError, match="no consensus label file.*labels_consensus.csv"):
        load_corpus("msp_podcast", tmp_path / "msp")
    with pytest.raises(CorpusError, match="MSP-Podcast root .* does not exist"):
        load_corpus("msp_podcast", tmp_path / "nope")


# --- generic CSV and folder-per-class -------------------------------------------------------------
def test_generic_csv_paths_labels_votes_and_defaults(tmp_path):
    root, outside = fx.build_generic_csv(tmp_path)
    rows = load_corpus("csv", root)
    check_contract(rows, "mycorpus")
    got = by_id(rows)
    b = got["mycorpus/audio/sub/b"]
    assert b["path"] == str(root.resolve() / "audio/sub/b.wav")
    assert (b["label"], b["speaker"], b["gender"], b["split"]) == (
        "angry",
        "mycorpus/s2",
        "F",
        "test",
    )
    assert b["votes"] == ["angry", "angry", "neutral"]
    a = got["mycorpus/audio/a"]
    assert (a["label"], a["session"], a["gender"], a["split"], a["votes"]) == (
        "happy", "day1", "M", "train", None,
    )  # fmt: skip
    c = got["mycorpus/c"]  # unlabeled pool row, no speaker
    assert (c["label"], c["speaker"], c["gender"], c["split"]) == (
        None,
        "mycorpus/unknown",
        None,
        None,
    )
    d = [r for r in rows if r["path"] == str(outside)]
    assert len(d) == 1 and d[0]["label"] == "sad" and d[0]["split"] == "val"
    # The CSV itself may be given, and the corpus may be renamed.
    renamed = load_corpus("csv", root / "labels.csv", corpus_name="other")
    assert {r["utt_id"].split("/", 1)[1] for r in renamed} == {
        r["utt_id"].split("/", 1)[1] for r in rows
    }
    assert {r["corpus"] for r in renamed} == {"other"}


def test_generic_csv_errors(tmp_path):
    with pytest.raises(CorpusError, match="labels.csv.*not found"):
        load_corpus("csv", tmp_path)
    fx.write_csv(tmp_path / "labels.csv", ["file", "label"], [["a.wav", "sad"]])
    with pytest.raises(CorpusError, match="lacks \\['path'\\]"):
        load_corpus("csv", tmp_path)
    fx.write_csv(tmp_path / "labels.csv", ["path", "split"], [["a.wav", "holdout"]])
    with pytest.raises(CorpusError, match="line 2: split 'holdout'"):
        load_corpus("csv", tmp_path)


def test_folders_labels_from_folder_names_and_speaker_regex(tmp_path):
    root = fx.build_folders(tmp_path)
    rows = load_corpus("folders", root, speaker_regex=r"(spk\d+)_")
    check_contract(rows, "toy", canonical_labels=False)  # "extras" is a folder name
    assert {r["utt_id"]: (r["label"], r["speaker"]) for r in rows} == {
        "toy/Angry/spk1_001": ("angry", "toy/spk1"),
        "toy/anger/spk2_002": ("angry", "toy/spk2"),
        "toy/Neutral/spk1_003": ("neutral", "toy/spk1"),
        "toy/sad/session1/spk2_004": ("sad", "toy/spk2"),
        "toy/extras/spk3_005": ("extras", "toy/spk3"),
    }
    restricted = load_corpus("folders", root, classes=["angry", "neutral", "sad"], corpus_name="c")
    assert len(restricted) == 4
    assert {r["speaker"] for r in restricted} == {"c/unknown"}
    assert {r["label"] for r in restricted} == {"angry", "neutral", "sad"}


def test_folders_missing_root(tmp_path):
    with pytest.raises(CorpusError, match="folder-per-class corpus root .* does not exist"):
        load_corpus("folders", tmp_path / "nope")


# --- registry, determinism, labels, merging -------------------------------------------------------
def test_load_corpus_unknown_name_lists_the_loaders():
    assert set(LOADERS) == {
        "iemocap", "savee", "ravdess", "cremad", "emodb", "msp_podcast", "csv", "folders",
    }  # fmt: skip
    with pytest.raises(CorpusError, match="unknown corpus 'timit'.*cremad.*iemocap"):
        load_corpus("timit", "/tmp")


def test_rows_do_not_depend_on_filesystem_order(tmp_path, monkeypatch):
    import os

    root = fx.build_ravdess(tmp_path)
    first = load_corpus("ravdess", root)
    real_walk = os.walk

    def reversed_walk(*args, **kwargs):
        for dirpath, dirnames, filenames in real_walk(*args, **kwargs):
            dirnames.reverse()
            yield dirpath, dirnames, list(reversed(filenames))

    monkeypatch.setattr(os, "walk", reversed_walk)
    assert load_corpus("ravdess", root) == first


def test_canonical_synonyms_and_presets():
    assert canonical("Anger") == "angry"
    assert canonical(" Happiness ") == "happy"
    assert canonical("fru") == "frustrated"
    assert canonical("pleasant-surprise") == "surprise"
    assert canonical("") is None
    assert canonical("Pleased") == "pleased"  # unknown spellings kept, lower-cased
    assert resolve_label_map("four_class") == FOUR_CLASS
    assert resolve_label_map({"Anger": "Angry", "fru": None}) == {
        "angry": "angry",
        "frustrated": None,
    }
    with pytest.raises(ConfigError, match="unknown preset 'five_class'"):
        resolve_label_map("five_class")


def test_apply_label_map_rules():
    rows = [
        {"utt_id": "c/1", "label": "excited", "votes": ["excited", "frustrated", "neutral"]},
        {"utt_id": "c/2", "label": "frustrated", "votes": ["frustrated"]},
        {"utt_id": "c/3", "label": None, "votes": None},
        {"utt_id": "c/4", "label": "calm", "votes": ["calm", "sad"]},
        {"utt_id": "c/5", "label": "sad", "votes": ["other"]},
    ]
    mapping = {**FOUR_CLASS, "frustrated": None}
    out = by_id(apply_label_map(rows, mapping))
    assert set(out) == {"c/1", "c/3", "c/5"}
    assert out["c/1"] == {"utt_id": "c/1", "label": "happy", "votes": ["happy", "neutral"]}
    assert out["c/3"]["label"] is None  # unlabeled pool rows are kept
    assert out["c/5"]["votes"] is None  # all its votes were for dropped classes
    kept = by_id(apply_label_map(rows, mapping, drop_unmapped=False))
    assert kept["c/2"]["label"] is None and kept["c/2"]["votes"] is None  # mapped to None
    assert kept["c/4"]["label"] == "calm" and kept["c/4"]["votes"] == ["calm", "sad"]  # unmapped
    assert rows[0]["label"] == "excited"  # input rows are not modified


def test_merge_two_corpora_with_four_class_map(iemocap_root, tmp_path):
    iemocap = load_corpus("iemocap", iemocap_root)
    ravdess = load_corpus("ravdess", fx.build_ravdess(tmp_path))
    merged = merge_corpora([(iemocap, FOUR_CLASS), (ravdess, resolve_label_map("four_class"))])
    ids = [r["utt_id"] for r in merged]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {r["label"] for r in merged} <= {"neutral", "happy", "angry", "sad"}
    counts = class_counts(merged)
    assert counts == {
        "iemocap": {"angry": 2, "happy": 2, "neutral": 1, "sad": 1},
        "ravdess": {"angry": 1, "neutral": 1},  # calm and surprise are not in the four classes
    }
    table = format_class_counts(merged)
    assert table.splitlines()[-1].split() == ["total", "3", "2", "2", "1", "8"]
    # Without a map, a part keeps all its labels.
    assert len(merge_corpora([(ravdess, None)])) == len(ravdess)
    with pytest.raises(CorpusError, match="appears in part 0 and part 1"):
        merge_corpora([(ravdess, None), (ravdess, None)])


def test_unknown_loader_option_is_a_config_error(tmp_path):
    root = fx.build_ravdess(tmp_path)
    with pytest.raises(
        ConfigError, match="include_songs not understood.*valid options: include_song"
    ):
        load_corpus("ravdess", root, include_songs=True)
    with pytest.raises(ConfigError, match="valid options: none"):
        load_corpus("emodb", root, speaker_regex="x")


def test_cremad_root_may_be_the_audiowav_folder(tmp_path):
    root = fx.build_cremad(tmp_path)
    rows = load_corpus("cremad", root / "AudioWAV")
    assert len(rows) == 4 and rows[0]["utt_id"] == "cremad/1001_DFA_ANG_XX"
    assert rows[0]["votes"] == ["angry", "angry", "neutral"] and rows[0]["gender"] == "M"

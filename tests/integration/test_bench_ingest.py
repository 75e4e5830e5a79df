"""``after-ray bench ingest`` (in process, on the session ``ray_session``): its figures are checked
against what is worked out here, not against its own flags.

One tiny run of three ways (ours, the Ray way with one dataset, the Ray way with a dataset per
epoch), two repeats each. From the WAV files and the manifest it wrote, the test recomputes:
which utt_ids each rank of ``ours`` gets and in what order (``rows[rank::world]`` shuffled by
the (seed, epoch) permutation, written out here); every crop's digest with the project's crop
function (``load_for_model`` + ``utterance_epoch_rng``) under the key each way must use; and the
summary figures from the rank records. The printed table must show the JSON's numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest

from after_ray.cli import main
from after_ray.config.audio import AudioConfig
from after_ray.data.audio import load_for_model
from after_ray.seeding import utterance_epoch_rng

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

N_FILES, SECONDS, BATCH, SEED = 10, 4.5, 4, 3
WAYS = ("ours", "ray", "ray_per_epoch")
WORLD, EPOCHS, REPEATS = 2, 2, 2


@pytest.fixture(scope="module")
def bench(ray_session, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench-ingest")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            [
                "bench",
                "ingest",
                "--n-files",
                str(N_FILES),
                "--seconds",
                str(SECONDS),
                "--batch-size",
                str(BATCH),
                "--seed",
                str(SEED),
                "--ways",
                ",".join(WAYS),
                "--out-dir",
                str(out_dir),
            ]
        )
    assert code == 0, stdout.getvalue()
    result = json.loads((out_dir / "bench_ingest.json").read_text())
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return {"out": stdout.getvalue(), "result": result, "manifest": manifest, "dir": out_dir}


def digest(samples: np.ndarray) -> str:
    """The crop digest, written out: SHA-256 of the float32 samples, first 16 hex digits."""
    return hashlib.sha256(np.asarray(samples, dtype=np.float32).tobytes()).hexdigest()[:16]


def crop(path: str, seed: int, epoch: int, utt_id: str) -> np.ndarray:
    (piece,) = load_for_model(
        path, AudioConfig(), "train", utterance_epoch_rng(seed, epoch, utt_id)
    )
    return piece


def expected_key(way: str, rank: int, epoch: int) -> tuple[int, int]:
    """(seed, epoch) of each way's crops: the loops seed each rank with seed + 7919 * rank and
    draw fresh crops each epoch; one dataset for the run has epoch 0 whatever the epoch."""
    if way == "ours":
        return SEED + 7919 * rank, epoch
    if way == "ray":
        return SEED, 0
    return SEED, epoch


def test_the_run_is_the_one_asked_for(bench):
    r = bench["result"]
    assert (r["n_files"], r["seconds_per_file"], r["batch_size"], r["seed"]) == (
        N_FILES,
        SECONDS,
        BATCH,
        SEED,
    )
    assert (r["num_workers"], r["epochs"], r["repeats"]) == (WORLD, EPOCHS, REPEATS)
    assert list(r["ways"]) == list(WAYS)
    assert len(sorted((bench["dir"] / "corpus").glob("*.wav"))) == N_FILES
    assert [row["utt_id"] for row in bench["manifest"]] == [
        f"bench/{Path(row['path']).stem}" for row in bench["manifest"]
    ]
    for way in WAYS:
        runs = r["runs"][way]
        assert len(runs) == REPEATS
        for run in runs:
            assert [rec["rank"] for rec in run["ranks"]] == list(range(WORLD))
            assert all(rec["world_size"] == WORLD for rec in run["ranks"])


def test_our_ranks_get_their_manifest_slice_in_the_seeded_order(bench):
    rows = bench["manifest"]
    for run in bench["result"]["runs"]["ours"]:
        for rec in run["ranks"]:
            rank = rec["rank"]
            share = [row["utt_id"] for row in rows[rank::WORLD]]
            for ep in rec["epochs"]:
                # audio_dataset's shuffle: a permutation drawn from (seed, epoch).
                seed = (SEED + 7919 * rank) & 0xFFFFFFFF
                order = np.random.default_rng([seed, ep["epoch"]]).permutation(len(share))
                assert ep["utt_ids"] == [share[i] for i in order], (rank, ep["epoch"])
    # The two epochs' orders differ (else the check above could not tell them apart).
    rec = bench["result"]["runs"]["ours"][0]["ranks"][0]
    assert rec["epochs"][0]["utt_ids"] != rec["epochs"][1]["utt_ids"]


def test_every_crop_is_the_crop_function_of_its_ways_key(bench):
    paths = {row["utt_id"]: row["path"] for row in bench["manifest"]}
    for way in WAYS:
        for run in bench["result"]["runs"][way]:
            delivered = []
            for rec in run["ranks"]:
                for ep in rec["epochs"]:
                    seed, epoch = expected_key(way, rec["rank"], ep["epoch"])
                    for utt_id, got in zip(ep["utt_ids"], ep["digests"], strict=True):
                        assert got == digest(crop(paths[utt_id], seed, epoch, utt_id)), (
                            way,
                            rec["rank"],
                            ep["epoch"],
                            utt_id,
                        )
                    delivered.append((ep["epoch"], sorted(ep["utt_ids"])))
            # Every utterance once per epoch, over the ranks.
            for e in range(EPOCHS):
                got = sorted(u for epoch, ids in delivered if epoch == e for u in ids)
                assert got == sorted(paths), (way, e)


def test_fresh_crops_per_epoch_only_where_the_epoch_is_in_the_key(bench):
    paths = {row["utt_id"]: row["path"] for row in bench["manifest"]}
    utt_id, path = next(iter(paths.items()))
    # The files are longer than the crop, so two epochs' random crops of one file differ.
    assert digest(crop(path, SEED, 0, utt_id)) != digest(crop(path, SEED, 1, utt_id))
    ways = bench["result"]["ways"]
    for way in WAYS:
        first = bench["result"]["runs"][way][0]
        by_epoch = [
            {
                u: d
                for rec in first["ranks"]
                for u, d in zip(
                    rec["epochs"][e]["utt_ids"], rec["epochs"][e]["digests"], strict=True
                )
            }
            for e in range(EPOCHS)
        ]
        repeated = sum(by_epoch[1][u] == by_epoch[0][u] for u in by_epoch[1])
        assert ways[way]["epoch_crops_repeated"] == repeated
        assert ways[way]["epoch_crops_compared"] == N_FILES
        assert repeated == (N_FILES if way == "ray" else 0), way


def test_summary_figures_follow_from_the_rank_records(bench):
    r = bench["result"]
    for way in WAYS:
        runs = r["runs"][way]
        w = r["ways"][way]
        delivered = sum(
            len(ep["utt_ids"]) for run in runs for rec in run["ranks"] for ep in rec["epochs"]
        )
        walls = [
            [max(rec["epochs"][e]["seconds"] for rec in run["ranks"]) for e in range(EPOCHS)]
            for run in runs
        ]
        assert w["utterances_delivered"] == delivered == REPEATS * EPOCHS * N_FILES
        assert w["epoch_seconds"] == walls
        assert w["utterances_per_s"] == pytest.approx(delivered / sum(map(sum, walls)))
        later = sum(wall for run_walls in walls for wall in run_walls[1:])
        assert w["utterances_per_s_after_first_epoch"] == pytest.approx(
            REPEATS * (EPOCHS - 1) * N_FILES / later
        )
        assert all(fit > sum(epochs) for fit, epochs in zip(w["fit_seconds"], walls, strict=True))
        # Places and crops of the second repeat against the first, per epoch.
        per_epoch = []
        for e in range(EPOCHS):
            places = [
                {
                    u: (rec["rank"], i, d)
                    for rec in run["ranks"]
                    for i, (u, d) in enumerate(
                        zip(rec["epochs"][e]["utt_ids"], rec["epochs"][e]["digests"], strict=True)
                    )
                }
                for run in runs
            ]
            counts = {"repeat": 1, "epoch": e, "rank": 0, "position": 0, "crop": 0}
            for u, (rank, position, d) in places[0].items():
                other = places[1][u]
                counts["rank"] += other[0] != rank
                counts["position"] += other[0] == rank and other[1] != position
                counts["crop"] += other[2] != d
            per_epoch.append(counts)
        assert w["moved_per_repeat"] == per_epoch
        moved_rank = sum(c["rank"] for c in per_epoch)
        moved_position = sum(c["position"] for c in per_epoch)
        changed = sum(c["crop"] for c in per_epoch)
        assert (w["moved_rank"], w["moved_position"], w["crops_changed_between_repeats"]) == (
            moved_rank,
            moved_position,
            changed,
        )
        assert w["resume_at_known_position"] == (moved_rank == moved_position == changed == 0)
        assert w["crops_as_computed"] == w["crops_total"] == delivered
    # Ours is reproducible by construction: nothing moves between repeats of one seed.
    assert r["ways"]["ours"]["resume_at_known_position"] is True


def test_the_printed_table_shows_the_json(bench):
    r = bench["result"]
    lines = bench["out"].splitlines()
    (header,) = [line for line in lines if line.startswith("bench ingest: ")]
    assert header.startswith(
        f"bench ingest: {N_FILES} files x {SECONDS:g} s (44100/48000 Hz stereo), 4 s crops, "
        f"2 workers x 1 CPU, batch {BATCH}, 2 epochs, 2 repeats of seed {SEED}; "
    )
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in WAYS:
            rows[cells[0]] = cells
    assert list(rows) == list(WAYS)
    for way, cells in rows.items():
        w = r["ways"][way]
        assert float(cells[1]) == round(w["utterances_per_s"], 1)
        assert float(cells[2]) == round(w["utterances_per_s_after_first_epoch"], 1)
        epoch_s = [[float(s) for s in rep.split("/")] for rep in cells[3].split("; ")]
        assert epoch_s == [[round(s, 2) for s in rep] for rep in w["epoch_seconds"]]
        assert [float(s) for s in cells[4].split("/")] == [round(s, 1) for s in w["fit_seconds"]]
        assert [int(x) for x in cells[5].split("/")] == w["missing_per_epoch_first_repeat"]
        assert [int(c) for c in cells[6:9]] == [
            w["moved_rank"],
            w["moved_position"],
            w["crops_changed_between_repeats"],
        ]
        assert cells[9] == f"{w['epoch_crops_repeated']}/{w['epoch_crops_compared']}"
        assert cells[10] == f"{w['crops_as_computed']}/{w['crops_total']} {w['crop_key']}"
        assert cells[11] == ("yes" if w["resume_at_known_position"] else "no")
    assert lines[-1] == f"results: {bench['dir'] / 'bench_ingest.json'}"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seconds", "3"], "seconds must exceed the 4 s training crop"),
        (["--ways", "ours,teleport"], "unknown ways ['teleport']"),
    ],
)
def test_bench_ingest_refuses_what_cannot_measure_anything(tmp_path, capsys, args, message):
    code = main(["bench", "ingest", "--out-dir", str(tmp_path), *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before writing a corpus

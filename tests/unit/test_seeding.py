"""The seed rules drew these values before they moved into ``after_ray.seeding``; a resumed
run, a TAPT cache key and the committed demo report depend on them drawing the same again."""

from __future__ import annotations

from after_ray import seeding


def test_blake2b_seed_values_are_pinned():
    assert seeding.blake2b_seed(7, 3, "utt_0001", "crop") == 155932965024354579
    assert seeding.blake2b_seed(0, "head") == 1630581361701944528


def test_seedsequence_seed_values_are_pinned():
    assert seeding.seedsequence_seed(7, 0, 12, 3) == 1170762105432641117
    assert seeding.seedsequence_seed(0, 2) == 8597659618385908031


def test_utterance_and_annotator_streams_are_pinned():
    crop = seeding.utterance_epoch_rng(7, 2, "utt_0001").integers(0, 2**31, 3).tolist()
    assert crop == [1510629262, 1147014143, 425187979]
    votes = seeding.annotator_rng(7, "utt_0001").integers(0, 2**31, 3).tolist()
    assert votes == [588839198, 568088306, 192461432]


def test_kmeans_restart_seeds_are_disjoint_across_seeds():
    assert seeding.kmeans_restart_seed(3, 4, 1) == 13
    firsts = {seeding.kmeans_restart_seed(s, 4, i) for s in range(5) for i in range(4)}
    assert len(firsts) == 20

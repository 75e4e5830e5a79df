"""Budget schedules (fraction / count / annotator-seconds) and the simulated oracle."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from after_ray.al.budget import Budget, annotator_seconds, take_within
from after_ray.al.oracle import SimulatedOracle, majority_label
from after_ray.errors import ConfigError, CorpusError

CLASSES = ["neutral", "happy", "angry", "sad"]

# --------------------------------------------------------------------------- budget


def test_fraction_schedule_matches_the_paper_shape():
    budget = Budget.from_config(
        SimpleNamespace(unit="fraction", initial=0.10, per_round=0.05, max_total=0.20)
    )
    assert budget.schedule(960) == [96, 144, 192]
    assert budget.round_sizes(960) == [96, 48, 48]
    # The pool itself works as well as its size.
    assert budget.schedule([f"u{i}" for i in range(960)]) == [96, 144, 192]


def test_fraction_schedule_uses_this_pool_not_a_hard_coded_size():
    budget = Budget("fraction", 0.10, 0.05, 0.20)
    # AFTER's code used int(4508 * 0.05) for every later round on any fold.
    assert budget.schedule(4446) == [444, 666, 889]
    assert budget.schedule(4508) == [450, 676, 901]
    # 0.15 * 960 is 143.99999999999997 in floating point: still 144.
    assert Budget("fraction", 0.15, 0.05, 0.15).schedule(960) == [144]


def test_fraction_schedule_ends_exactly_at_max_total_with_a_short_last_step():
    assert Budget("fraction", 0.10, 0.05, 0.22).schedule(1000) == [100, 150, 200, 220]
    # Steps too small to add an item on a tiny pool are merged, never a zero-size round.
    assert Budget("fraction", 0.5, 0.01, 0.53).schedule(20) == [10]


def test_count_schedule_is_capped_at_the_pool():
    assert Budget("count", 100, 50, 300).schedule(960) == [100, 150, 200, 250, 300]
    assert Budget("count", 100, 50, 300).schedule(120) == [100, 120]


def test_invalid_budgets_raise_config_errors():
    with pytest.raises(ConfigError, match="initial"):
        Budget("fraction", 0.3, 0.05, 0.2)
    with pytest.raises(ConfigError, match="at most 1"):
        Budget("fraction", 0.1, 0.05, 1.5)
    with pytest.raises(ConfigError, match="whole number"):
        Budget("count", 10.5, 5, 20)
    with pytest.raises(ConfigError, match="unit"):
        Budget("hours", 1, 1, 2)
    with pytest.raises(ConfigError, match="0 items"):
        Budget("fraction", 0.01, 0.01, 0.02).schedule(50)


def test_seconds_schedule_and_take_within():
    durations = {"a": 4.0, "b": 6.0, "c": 10.0, "d": 2.0, "e": 8.0}
    budget = Budget("seconds", 20, 10, 45)
    assert budget.measure == "annotator_seconds"
    assert budget.schedule(durations, votes_per_item=2) == [20.0, 30.0, 40.0, 45.0]
    # Capped by what labeling everything costs: 30 s of audio x 1 vote.
    assert budget.schedule(durations, votes_per_item=1) == [20.0, 30.0]
    # Two votes each: a (8) + b (12) = 20 fits; c (20 more) does not, and d is not taken past it.
    assert take_within(["a", "b", "c", "d"], durations, 20.0, votes_per_item=2) == ["a", "b"]
    assert take_within(["c", "a"], durations, 9.9, votes_per_item=1) == []
    assert annotator_seconds(["a", "b"], durations, votes_per_item=3) == 30.0
    # Budget.take: round 1's target 30, 18 already spent -> 12 annotator-seconds left.
    assert budget.take(
        ["d", "a", "b"], target=30.0, spent=18.0, durations=durations, votes_per_item=2
    ) == ["d", "a"]
    with pytest.raises(CorpusError, match="duration"):
        take_within(["a", "zzz"], durations, 100.0)
    with pytest.raises(CorpusError, match="prepare"):
        budget.schedule({"a": 1.0, "b": None})


def test_item_budget_take_respects_target_minus_spent():
    budget = Budget("count", 4, 2, 8)
    ranked = ["e", "d", "c", "b", "a"]
    assert budget.take(ranked, target=6, spent=4) == ["e", "d"]
    assert budget.take(ranked, target=6, spent=6) == []


# --------------------------------------------------------------------------- oracle


def _manifest(n: int, votes=None, labels=None) -> dict[str, dict]:
    rows = {}
    for i in range(n):
        label = labels[i % len(labels)] if labels else CLASSES[i % len(CLASSES)]
        rows[f"synth/u{i:05d}"] = {"utt_id": f"synth/u{i:05d}", "label": label, "votes": votes}
    return rows


def test_clean_oracle_reveals_the_manifest():
    rows = _manifest(20)
    rows["synth/u00000"]["votes"] = ["neutral", "other", "neutral", "sad"]
    oracle = SimulatedOracle(rows, class_names=CLASSES, seed=3)
    answers = oracle.label(list(rows), round=2)
    assert [a["label"] for a in answers] == [r["label"] for r in rows.values()]
    assert {a["source"] for a in answers} == {"simulated"}
    assert {a["round"] for a in answers} == {2}
    # Recorded votes pass through, restricted to the class set.
    assert answers[0]["votes"] == ["neutral", "neutral", "sad"]
    assert answers[1]["votes"] is None


def test_oracle_is_deterministic_per_item_whatever_the_batch():
    rows = _manifest(200, votes=["happy", "sad", "angry"])
    ids = list(rows)
    oracle = SimulatedOracle(rows, votes_per_item=3, label_noise=0.2, seed=7, class_names=CLASSES)
    whole = {a["utt_id"]: a for a in oracle.label(ids, 1)}
    reversed_batch = {a["utt_id"]: a for a in oracle.label(ids[::-1], 1)}
    one_by_one = {u: oracle.label([u], 1)[0] for u in ids[::7]}
    fresh = SimulatedOracle(rows, votes_per_item=3, label_noise=0.2, seed=7, class_names=CLASSES)
    assert whole == reversed_batch == {a["utt_id"]: a for a in fresh.label(ids, 1)}
    assert all(one_by_one[u] == whole[u] for u in one_by_one)
    other_seed = SimulatedOracle(
        rows, votes_per_item=3, label_noise=0.2, seed=8, class_names=CLASSES
    )
    changed = sum(a["votes"] != whole[a["utt_id"]]["votes"] for a in other_seed.label(ids, 1))
    assert changed > 50


def test_label_noise_flips_at_the_configured_rate_to_other_classes():
    rows = _manifest(4000)
    oracle = SimulatedOracle(rows, label_noise=0.3, seed=0, class_names=CLASSES)
    answers = oracle.label(list(rows), 0)
    flipped = [a for a in answers if a["label"] != rows[a["utt_id"]]["label"]]
    assert abs(len(flipped) / len(answers) - 0.3) < 0.03
    # Uniform over the three other classes: each ~1/3 of the flips of "neutral" items.
    from_neutral = Counter(a["label"] for a in flipped if rows[a["utt_id"]]["label"] == "neutral")
    assert set(from_neutral) == {"happy", "angry", "sad"}
    assert all(abs(n / sum(from_neutral.values()) - 1 / 3) < 0.08 for n in from_neutral.values())


def test_votes_are_drawn_from_the_vote_distribution():
    rows = _manifest(3000, votes=["happy", "happy", "happy", "sad"], labels=["happy"])
    single = SimulatedOracle(rows, votes_per_item=1, seed=1, class_names=CLASSES).label(rows, 0)
    share_happy = sum(a["label"] == "happy" for a in single) / len(single)
    assert abs(share_happy - 0.75) < 0.03
    assert all(a["votes"] == [a["label"]] for a in single)
    five = SimulatedOracle(rows, votes_per_item=5, seed=1, class_names=CLASSES).label(rows, 0)
    assert all(len(a["votes"]) == 5 for a in five)
    assert all(a["label"] == Counter(a["votes"]).most_common(1)[0][0] for a in five)
    # P(majority of 5 draws at p=0.75 is happy) = 0.896.
    assert abs(sum(a["label"] == "happy" for a in five) / len(five) - 0.896) < 0.03


def test_items_without_votes_get_their_hard_label_from_every_annotator():
    rows = _manifest(8)
    answers = SimulatedOracle(rows, votes_per_item=3, class_names=CLASSES).label(rows, 0)
    assert all(a["votes"] == [rows[a["utt_id"]]["label"]] * 3 for a in answers)


def test_ties_prefer_the_manifest_label_then_class_order():
    assert majority_label(["sad", "happy"], CLASSES, prefer="sad") == "sad"
    assert majority_label(["sad", "happy"], CLASSES, prefer="neutral") == "happy"
    rows = _manifest(400, votes=["happy", "sad"], labels=["sad"])
    answers = SimulatedOracle(rows, votes_per_item=2, seed=5, class_names=CLASSES).label(rows, 0)
    ties = [a for a in answers if sorted(a["votes"]) == ["happy", "sad"]]
    assert len(ties) > 100 and all(a["label"] == "sad" for a in ties)


def test_oracle_refuses_unlabeled_unknown_and_out_of_set_items():
    rows = _manifest(4)
    rows["pool/x"] = {"utt_id": "pool/x", "label": None, "votes": None}
    rows["odd/y"] = {"utt_id": "odd/y", "label": "contempt", "votes": None}
    oracle = SimulatedOracle(rows, class_names=CLASSES)
    with pytest.raises(ConfigError, match="human"):
        oracle.label(["synth/u00000", "pool/x"], 0)
    with pytest.raises(CorpusError, match="not in the manifest"):
        oracle.label(["nope"], 0)
    with pytest.raises(CorpusError, match="corpus.classes"):
        oracle.label(["odd/y"], 0)
    with pytest.raises(ConfigError):
        SimulatedOracle(rows, label_noise=1.0, class_names=CLASSES)
    with pytest.raises(ConfigError):
        SimulatedOracle(rows, class_names=["only"])


# --------------------------------------------------------------------------- budget: edges


def test_from_config_reads_every_field():
    config = SimpleNamespace(unit="count", initial=7, per_round=3, max_total=13)
    assert Budget.from_config(config) == Budget("count", 7, 3, 13)
    assert Budget.from_config(config).schedule(100) == [7, 10, 13]


def test_budget_boundaries():
    # A whole pool (fraction 1) is allowed; one item is a pool; one item is a first round.
    assert Budget("fraction", 0.5, 0.5, 1.0).schedule(10) == [5, 10]
    assert Budget("count", 1, 1, 1).schedule(1) == [1]
    assert Budget("fraction", 0.1, 0.1, 0.2).schedule(10) == [1, 2]
    assert Budget("fraction", 0.1, 0.1, 0.2).round_sizes(10) == [1, 1]
    assert Budget("count", 4, 2, 8).take(["e", "d", "c"], target=5, spent=4) == ["e"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("hours", 1, 1, 2),
            "al.budget.unit: 'hours' is not one of fraction, count, seconds",
        ),
        (("count", 0, 1, 2), "al.budget.initial: must be a positive number, got 0"),
        (
            ("fraction", float("nan"), 0.05, 0.2),
            "al.budget.initial: must be a positive number, got nan",
        ),
        (("count", 1, float("inf"), 2), "al.budget.per_round: must be a positive number, got inf"),
        (("fraction", "0.1", 0.05, 0.2), "al.budget.initial: must be a positive number, got '0.1'"),
        (
            ("count", 0, 1.5, 2),
            "al.budget.initial: must be a positive number, got 0; "
            "al.budget.per_round: a count must be a whole number, got 1.5",
        ),
        (
            ("fraction", 0.1, 0.05, 1.5),
            "al.budget.max_total: a fraction must be at most 1, got 1.5",
        ),
        (("fraction", 0.3, 0.05, 0.2), "al.budget.initial (0.3) exceeds al.budget.max_total (0.2)"),
    ],
)
def test_invalid_budget_messages(args, message):
    with pytest.raises(ConfigError) as err:
        Budget(*args)
    assert str(err.value) == message


def test_schedule_and_take_refusals_name_the_problem():
    durations = {"a": 4.0, "b": 6.0}
    cases = [
        (
            lambda: Budget().schedule(0),
            CorpusError,
            "the training pool is empty: there is nothing to label",
        ),
        (
            lambda: Budget().schedule([]),
            CorpusError,
            "the training pool is empty: there is nothing to label",
        ),
        (
            lambda: Budget("fraction", 0.01, 0.01, 0.02).schedule(50),
            ConfigError,
            "al.budget.initial: 0.01 of a pool of 50 items is 0 items; raise it (or use unit: count)",
        ),
        (
            lambda: Budget().schedule(10, votes_per_item=0),
            ValueError,
            "votes_per_item must be >= 1, got 0",
        ),
        (
            lambda: Budget("seconds", 1, 1, 2).round_sizes(durations),
            ValueError,
            "a seconds budget has no fixed round sizes: take candidates with take_within",
        ),
        (
            lambda: Budget("seconds", 1, 1, 2).take(["a"], target=2, spent=0),
            ValueError,
            "a seconds budget needs the candidates' durations",
        ),
        (
            lambda: Budget("seconds", 1, 1, 2).schedule(10),
            ValueError,
            "a seconds budget needs the pool's durations, not its size",
        ),
        (
            lambda: take_within(["a"], durations, 5.0, 0),
            ValueError,
            "votes_per_item must be >= 1, got 0",
        ),
        (
            lambda: take_within(["a", "zzz"], durations, 100.0),
            CorpusError,
            "utterance 'zzz' has no usable duration (None); a seconds budget needs every duration: "
            "run `after-ray prepare`, which reads them from the audio headers",
        ),
        (
            lambda: Budget("seconds", 1, 1, 2).schedule([3.0, 0.0]),
            CorpusError,
            "utterance #1 has no usable duration (0.0); a seconds budget needs every duration: "
            "run `after-ray prepare`, which reads them from the audio headers",
        ),
    ]
    for call, error, message in cases:
        with pytest.raises(error) as err:
            call()
        assert str(err.value) == message


def test_seconds_budget_defaults_to_one_vote_and_reads_a_list_of_durations():
    from after_ray.al.budget import pool_annotator_seconds

    durations = {"a": 4.0, "b": 6.0, "c": 10.0, "d": 2.0, "e": 8.0}
    budget = Budget("seconds", 20, 10, 45)
    assert budget.schedule(durations) == [20.0, 30.0]  # 30 s of audio, one vote each
    assert budget.schedule([4.0, 6.0, 10.0, 2.0, 8.0]) == [20.0, 30.0]
    assert pool_annotator_seconds(durations) == 30.0
    assert pool_annotator_seconds([0.5, 1.0, 2.5]) == 4.0
    assert pool_annotator_seconds([0.5, 1.0, 2.5], votes_per_item=3) == 12.0
    assert annotator_seconds(["a", "d"], durations) == 6.0
    assert take_within(["d", "a", "b"], durations, 6.0) == ["d", "a"]
    assert budget.take(["d", "a", "b"], target=30.0, spent=24.0, durations=durations) == ["d", "a"]
    # Nothing left to spend: no candidate, and no durations needed to know it.
    assert budget.take(["d"], target=30.0, spent=30.0) == []


def test_take_within_accumulates_and_keeps_a_clip_within_rounding_of_the_allowance():
    durations = {"a": 4.0, "b": 6.0, "d": 2.0, "x": 1.0 + 1e-9, "one": 1.0}
    # 8 + 12 = 20 is spent; d (4 more) would make 24.
    assert take_within(["a", "b", "d"], durations, 20.0, votes_per_item=2) == ["a", "b"]
    assert take_within(["x"], durations, 1.0) == ["x"]
    assert take_within(["one", "one"], durations, 1.5) == ["one"]
    with pytest.raises(CorpusError):
        take_within(["z"], {"z": 0.0}, 5.0)


def test_a_budget_beyond_the_pool_warns_once_with_the_numbers(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="after_ray.al.budget"):
        assert Budget("count", 100, 50, 300).schedule(300) == [100, 150, 200, 250, 300]
        assert Budget("seconds", 2, 2, 4).schedule({"a": 2.0, "b": 2.0}) == [2.0, 4.0]
    assert caplog.records == []  # exactly the pool: nothing to warn about
    with caplog.at_level(logging.WARNING, logger="after_ray.al.budget"):
        Budget("count", 100, 50, 300).schedule(120)
        Budget("seconds", 2, 2, 6).schedule({"a": 2.0, "b": 2.5})
    assert [r.getMessage() for r in caplog.records] == [
        "the budget (300 count) exceeds the pool (120 items); the schedule stops when the pool "
        "is fully labeled",
        "the budget (6 seconds) exceeds the pool (4.5 annotator-seconds); the schedule stops "
        "when the pool is fully labeled",
    ]


# --------------------------------------------------------------------------- oracle: edges


def test_oracle_from_config_defaults_and_two_classes():
    from after_ray.al.oracle import rows_by_id

    rows = rows_by_id([{"utt_id": "a", "label": "x"}, {"utt_id": "b", "label": "y", "votes": None}])
    assert rows == {
        "a": {"utt_id": "a", "label": "x"},
        "b": {"utt_id": "b", "label": "y", "votes": None},
    }
    config = SimpleNamespace(votes_per_item=3, label_noise=0.25, seed=11)
    oracle = SimulatedOracle.from_config(config, rows, ["x", "y"])
    assert repr(oracle) == "SimulatedOracle(votes_per_item=3, label_noise=0.25, seed=11, classes=2)"
    assert oracle.rows is rows and oracle.class_names == ["x", "y"]
    direct = SimulatedOracle(
        rows, votes_per_item=3, label_noise=0.25, seed=11, class_names=["x", "y"]
    )
    assert oracle.label(["a", "b"], 4) == direct.label(["a", "b"], 4)
    # seed defaults to 0
    many = _manifest(300)
    noisy = SimulatedOracle(many, label_noise=0.5, class_names=CLASSES)
    assert noisy.label(list(many), 0) == SimulatedOracle(
        many, label_noise=0.5, seed=0, class_names=CLASSES
    ).label(list(many), 0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            {"class_names": ["a"]},
            "the simulated oracle needs at least two distinct class names, got ['a']",
        ),
        (
            {"class_names": ["a", "a"]},
            "the simulated oracle needs at least two distinct class names, got ['a', 'a']",
        ),
        (
            {"class_names": ["a", "b"], "votes_per_item": 0},
            "al.oracle.votes_per_item: must be at least 1 (or null)",
        ),
        (
            {"class_names": ["a", "b"], "label_noise": 1.0},
            "al.oracle.label_noise: must be in [0, 1), got 1.0",
        ),
    ],
)
def test_oracle_config_refusals(kwargs, message):
    with pytest.raises(ConfigError) as err:
        SimulatedOracle({}, **kwargs)
    assert str(err.value) == message


def test_oracle_refusal_messages_in_full():
    rows = {
        "pool/x": {"utt_id": "pool/x", "label": None},
        "odd/y": {"utt_id": "odd/y", "label": "contempt"},
    }
    oracle = SimulatedOracle(rows, class_names=["a", "b"])
    with pytest.raises(ConfigError) as err:
        oracle.label(["pool/x"], 0)
    assert str(err.value) == (
        "'pool/x' has no label in the manifest (unlabeled pool): a simulated oracle cannot label "
        "it. Set al.oracle.kind: human and label it with `after-ray label export` / "
        "`after-ray label import`"
    )
    with pytest.raises(CorpusError) as err:
        oracle.label(["nope"], 0)
    assert str(err.value) == "'nope' is not in the manifest the oracle was given"
    with pytest.raises(CorpusError) as err:
        oracle.label(["odd/y"], 0)
    assert str(err.value) == (
        "'odd/y' is labeled 'contempt', which is not one of the classes ['a', 'b']: add it to "
        "corpus.classes or map it with corpus.label_map"
    )


def test_noise_hits_each_recorded_vote_independently_with_its_own_other_class():
    # Three recorded votes per item, all "neutral". Each vote flips on its own coin (so an item
    # mixes flipped and kept votes 1 - 0.5^3 - 0.5^3 = 3/4 of the time), and each flipped vote
    # draws its own other class (two flipped votes differ 2/3 of the time).
    rows = _manifest(4000, votes=["neutral", "neutral", "neutral"], labels=["neutral"])
    answers = SimulatedOracle(rows, label_noise=0.5, seed=2, class_names=CLASSES).label(rows, 0)
    flipped = [[v for v in a["votes"] if v != "neutral"] for a in answers]
    mixed = sum(0 < len(f) < 3 for f in flipped) / len(flipped)
    assert abs(mixed - 0.75) < 0.03
    pairs = [f[:2] for f in flipped if len(f) >= 2]
    assert abs(sum(a != b for a, b in pairs) / len(pairs) - 2 / 3) < 0.04

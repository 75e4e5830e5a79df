"""UA / WA / macro-F1 / confusion matrix on hand-computed cases and against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from after_ray.metrics import (
    classification_report,
    confusion_matrix,
    macro_f1,
    unweighted_accuracy,
    weighted_accuracy,
)

# Class 3 has neither support nor predictions.
Y_TRUE = [0, 0, 0, 1, 1, 2]
Y_PRED = [0, 0, 1, 1, 2, 2]


def test_confusion_matrix_rows_are_true_classes():
    expected = [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert confusion_matrix(Y_TRUE, Y_PRED, 4).tolist() == expected


def test_hand_computed_case_with_a_class_without_support():
    # recalls 2/3, 1/2, 1 over the three classes with support
    assert unweighted_accuracy(Y_TRUE, Y_PRED, 4) == pytest.approx(13 / 18)
    # AFTER's convention counts the unsupported class as recall 0
    assert unweighted_accuracy(Y_TRUE, Y_PRED, 4, missing="zero") == pytest.approx(13 / 24)
    assert weighted_accuracy(Y_TRUE, Y_PRED, 4) == pytest.approx(4 / 6)
    # F1: 2*2/(3+2), 2*1/(2+2), 2*1/(1+2); class 3 is absent from both and left out
    assert macro_f1(Y_TRUE, Y_PRED, 4) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_predicted_class_without_support_counts_as_f1_zero_but_not_in_ua():
    y_true, y_pred = [0, 0, 1], [0, 2, 1]
    assert unweighted_accuracy(y_true, y_pred, 3) == pytest.approx(0.75)
    assert unweighted_accuracy(y_true, y_pred, 3, missing="zero") == pytest.approx(0.5)
    assert macro_f1(y_true, y_pred, 3) == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)


def test_perfect_and_degenerate_predictions():
    labels = [0, 1, 2, 1, 0]
    assert unweighted_accuracy(labels, labels, 3) == 1.0
    assert weighted_accuracy(labels, labels, 3) == 1.0
    assert macro_f1(labels, labels, 3) == 1.0
    # everything predicted as class 0
    y_true, y_pred = [0, 1, 2, 0], [0, 0, 0, 0]
    assert unweighted_accuracy(y_true, y_pred, 3) == pytest.approx(1 / 3)
    assert weighted_accuracy(y_true, y_pred, 3) == pytest.approx(0.5)
    assert macro_f1(y_true, y_pred, 3) == pytest.approx((2 / 3) / 3)


def test_report_holds_everything_and_marks_undefined_values():
    report = classification_report(Y_TRUE, Y_PRED, ["angry", "happy", "sad", "neutral"])
    assert report["ua"] == pytest.approx(13 / 18)
    assert report["ua_missing_as_zero"] == pytest.approx(13 / 24)
    assert report["wa"] == pytest.approx(4 / 6)
    assert report["n"] == 6
    assert report["confusion"][0] == [2, 1, 0, 0]
    assert report["per_class"]["angry"] == {
        "recall": pytest.approx(2 / 3),
        "precision": 1.0,
        "f1": pytest.approx(0.8),
        "support": 3,
    }
    assert report["per_class"]["neutral"] == {
        "recall": None,
        "precision": None,
        "f1": None,
        "support": 0,
    }


@pytest.mark.parametrize(
    "y_true, y_pred, message",
    [
        ([0, 1], [0, 3], "outside"),
        ([0, 1], [0], "items"),
        ([], [], "empty"),
        ([0, -1], [0, 1], "outside"),
    ],
)
def test_bad_inputs_are_refused(y_true, y_pred, message):
    with pytest.raises(ValueError, match=message):
        unweighted_accuracy(y_true, y_pred, 3)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=40))
def test_matches_a_brute_force_loop(pairs):
    y_true = [t for t, _ in pairs]
    y_pred = [p for _, p in pairs]
    recalls, f1s = [], []
    for c in range(4):
        tp = sum(t == c and p == c for t, p in pairs)
        support = sum(t == c for t in y_true)
        predicted = sum(p == c for p in y_pred)
        if support:
            recalls.append(tp / support)
        if support or predicted:
            precision = tp / predicted if predicted else 0.0
            recall = tp / support if support else 0.0
            f1s.append(2 * precision * recall / (precision + recall) if tp else 0.0)
    assert unweighted_accuracy(y_true, y_pred, 4) == pytest.approx(np.mean(recalls))
    assert macro_f1(y_true, y_pred, 4) == pytest.approx(np.mean(f1s))
    assert weighted_accuracy(y_true, y_pred, 4) == pytest.approx(np.mean(np.equal(y_true, y_pred)))


# ------------------------------------------------------------------ values the mutation check asks for


def test_confusion_counts_stay_integers_in_the_json_report():
    # The report is written as JSON: counts must come out as 2, not 2.0.
    import json

    assert confusion_matrix(Y_TRUE, Y_PRED, 4).dtype == np.int64
    report = classification_report(Y_TRUE, Y_PRED, ["a", "b", "c", "d"])
    assert (
        json.dumps(report["confusion"])
        == "[[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]"
    )
    assert json.dumps(report["per_class"]["a"]["support"]) == "3"


def test_undefined_ratios_are_silent():
    # A class without support or predictions is expected, not a numpy warning per evaluation.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = classification_report([0, 0, 1], [0, 2, 1], ["a", "b", "c", "d"])
        assert unweighted_accuracy([0, 0, 1], [0, 2, 1], 4, missing="zero") == pytest.approx(0.375)
    # recall 1/2, precision 1: class "a"; "c" was predicted once and is never true: precision 0,
    # recall undefined, F1 0 (it is present); "d" is absent from both.
    assert report["per_class"]["a"] == {
        "recall": 0.5,
        "precision": 1.0,
        "f1": pytest.approx(2 / 3),
        "support": 2,
    }
    assert report["per_class"]["b"] == {"recall": 1.0, "precision": 1.0, "f1": 1.0, "support": 1}
    assert report["per_class"]["c"] == {"recall": None, "precision": 0.0, "f1": 0.0, "support": 0}
    assert report["per_class"]["d"] == {"recall": None, "precision": None, "f1": None, "support": 0}
    assert report["macro_f1"] == pytest.approx((2 / 3 + 1.0 + 0.0) / 3)
    assert report["ua"] == pytest.approx(0.75)
    assert report["ua_missing_as_zero"] == pytest.approx(0.375)
    assert report["class_names"] == ["a", "b", "c", "d"]
    assert set(report) == {
        "ua",
        "ua_missing_as_zero",
        "wa",
        "macro_f1",
        "n",
        "class_names",
        "per_class",
        "confusion",
    }


def test_report_ua_follows_the_missing_rule():
    report = classification_report(Y_TRUE, Y_PRED, ["a", "b", "c", "d"], missing="zero")
    assert report["ua"] == pytest.approx(13 / 24)
    assert report["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert report["per_class"]["b"] == {"recall": 0.5, "precision": 0.5, "f1": 0.5, "support": 2}


def test_one_class_and_float_labels():
    # One class is a valid (if trivial) problem; whole-number floats are class indices.
    assert unweighted_accuracy([0, 0], [0, 0], 1) == 1.0
    assert macro_f1(np.array([0.0, 1.0, 1.0]), np.array([0.0, 1.0, 0.0]), 2) == pytest.approx(
        (2 / 3 + 2 / 3) / 2
    )
    assert confusion_matrix([1.0, 2.0], [2.0, 2.0], 3).tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 1]]


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: unweighted_accuracy([0.5, 1.0], [0, 1], 2),
            "y_true must hold integer class indices, got dtype float64",
        ),
        (
            lambda: unweighted_accuracy([0, 1], [[0, 1]], 2),
            "y_pred must be a 1-D sequence of class indices, got shape (1, 2)",
        ),
        (
            lambda: unweighted_accuracy([0, 1], [0, 2], 2),
            "y_pred has class indices outside [0, 2): min 0, max 2 (drop unlabeled items, marked -1, first)",
        ),
        (
            lambda: unweighted_accuracy([-1, 1], [0, 1], 2),
            "y_true has class indices outside [0, 2): min -1, max 1 (drop unlabeled items, marked -1, first)",
        ),
        (lambda: unweighted_accuracy([0], [0], 0), "n_classes must be at least 1, got 0"),
        (lambda: unweighted_accuracy([0, 1], [0], 2), "y_true has 2 items but y_pred has 1"),
        (
            lambda: unweighted_accuracy([], [], 2),
            "cannot compute metrics on an empty set of predictions",
        ),
        (
            lambda: unweighted_accuracy([0], [0], 2, missing="drop"),
            "missing must be 'skip' or 'zero', got 'drop'",
        ),
    ],
)
def test_refusals_say_exactly_what_is_wrong(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert str(err.value) == message


# ------------------------------------------------------------------ area under the learning curve


def test_area_under_curve_hand_computed():
    from after_ray.metrics import area_under_curve

    # Trapezoids over [0.1, 0.3]: (0.5 + 0.7) / 2 * 0.1 + (0.7 + 0.6) / 2 * 0.1 = 0.125; / 0.2.
    assert area_under_curve([0.1, 0.2, 0.3], [0.5, 0.7, 0.6]) == pytest.approx(0.625)
    # Points are sorted by fraction first (the y values move with their x).
    assert area_under_curve([0.3, 0.1, 0.2], [0.6, 0.5, 0.7]) == pytest.approx(0.625)
    # Uneven spacing: (1 + 3) / 2 * 1 + (3 + 3) / 2 * 3 = 11 over a range of 4.
    assert area_under_curve([1, 2, 5], [1, 3, 3]) == pytest.approx(11 / 4)
    # A constant curve gives its value whatever the range; one point gives its value.
    assert area_under_curve([0.2, 0.9], [0.4, 0.4]) == pytest.approx(0.4)
    assert area_under_curve([0.5], [0.8]) == 0.8
    # Several points at one fraction (zero range): their mean, the limit of the normalised area.
    assert area_under_curve([0.5, 0.5], [0.6, 0.8]) == pytest.approx(0.7)
    assert isinstance(area_under_curve((0, 1), (1, 0)), float)


@pytest.mark.parametrize(
    "fractions, values, message",
    [
        ([], [], "area_under_curve needs at least one point"),
        (
            [0.1, 0.2],
            [0.5],
            "fractions and values must be 1-D and of equal length, got (2,) and (1,)",
        ),
        (
            [[0.1, 0.2]],
            [[0.5, 0.6]],
            "fractions and values must be 1-D and of equal length, got (1, 2) and (1, 2)",
        ),
        (
            [0.1, float("nan")],
            [0.5, 0.6],
            "area_under_curve needs finite fractions and values (drop missing ones)",
        ),
        (
            [0.1, 0.2],
            [0.5, float("inf")],
            "area_under_curve needs finite fractions and values (drop missing ones)",
        ),
    ],
)
def test_area_under_curve_refusals(fractions, values, message):
    from after_ray.metrics import area_under_curve

    with pytest.raises(ValueError) as err:
        area_under_curve(fractions, values)
    assert str(err.value) == message


def test_a_class_seen_once_and_never_predicted_has_f1_zero():
    report = classification_report([0, 1], [0, 0], ["a", "b"])
    assert report["per_class"]["b"] == {"recall": 0.0, "precision": None, "f1": 0.0, "support": 1}
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)


def test_area_under_curve_refuses_missing_values():
    from after_ray.metrics import area_under_curve

    for fractions, values in (([0.1, 0.2], [0.5, None]), ([0.1, None], [0.5, 0.6])):
        with pytest.raises(ValueError) as err:
            area_under_curve(fractions, values)
        assert str(err.value) == (
            "area_under_curve needs finite fractions and values (drop missing ones)"
        )


def test_area_under_curve_keeps_the_input_order_of_equal_fractions():
    # Several curves concatenated (one per seed) repeat every fraction; the sort is stable, so
    # the result is the trapezoid over the points in (fraction, input position) order.
    from after_ray.metrics import area_under_curve

    rng = np.random.default_rng(0)
    x = rng.permutation(np.repeat(np.arange(1, 21) / 20, 10))
    y = rng.random(len(x))
    order = sorted(range(len(x)), key=lambda i: x[i])
    xs, ys = x[order], y[order]
    area = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
    assert area_under_curve(x, y) == pytest.approx(area / (xs[-1] - xs[0]), rel=1e-12)

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

"""Classification metrics for speech emotion recognition: UA, WA, macro-F1, confusion matrix.

Pure numpy (no torch, no Ray) so the AL core and the report can use it anywhere.

Conventions, chosen explicitly because SER papers differ here:

* **UA** (unweighted accuracy, "UAR") is the mean per-class recall. By default it averages over
  the classes that have at least one true example in ``y_true`` (``missing="skip"``): a class that
  is absent from an evaluation split says nothing about the model, and counting it as recall 0
  would make UA depend on which classes a split happens to contain. AFTER's ``utils/metrics.py``
  instead counts such a class as recall 0 (``missing="zero"``); use that flag to reproduce its
  numbers.
* **WA** (weighted accuracy) is the overall accuracy, trace / total.
* **macro-F1** is the mean of per-class F1 over the classes that occur in ``y_true`` *or* in
  ``y_pred`` (the same label set scikit-learn uses when none is given). F1 is 0 for a class when
  it is undefined (no true positive): a class that is predicted but never true therefore counts
  as F1 0 (it only produced false positives), and a class absent from both is left out.

Labels are integer class indices in ``[0, n_classes)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

MissingClassRule = Literal["skip", "zero"]


def _as_labels(values: Any, n_classes: int, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of class indices, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")
        array = array.astype(np.int64)
    array = array.astype(np.int64, copy=False)
    if array.size and (array.min() < 0 or array.max() >= n_classes):
        raise ValueError(
            f"{name} has class indices outside [0, {n_classes}): "
            f"min {array.min()}, max {array.max()} (drop unlabeled items, marked -1, first)"
        )
    return array


def _pair(y_true: Any, y_pred: Any, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    if n_classes < 1:
        raise ValueError(f"n_classes must be at least 1, got {n_classes}")
    true = _as_labels(y_true, n_classes, "y_true")
    pred = _as_labels(y_pred, n_classes, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true has {true.size} items but y_pred has {pred.size}")
    if true.size == 0:
        raise ValueError("cannot compute metrics on an empty set of predictions")
    return true, pred


def confusion_matrix(y_true: Any, y_pred: Any, n_classes: int) -> np.ndarray:
    """Counts ``[n_classes, n_classes]``: row = true class, column = predicted class."""
    true, pred = _pair(y_true, y_pred, n_classes)
    flat = np.bincount(true * n_classes + pred, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes).astype(np.int64)


def _per_class(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Recall / precision / F1 per class, NaN where undefined (no support / no prediction)."""
    true_positive = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        recall = np.where(support > 0, true_positive / support, np.nan)
        precision = np.where(predicted > 0, true_positive / predicted, np.nan)
        denominator = support + predicted  # = 2TP + FP + FN
        f1 = np.where(denominator > 0, 2.0 * true_positive / denominator, np.nan)
    return {
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "support": support.astype(np.int64),
        "predicted": predicted.astype(np.int64),
    }


def _ua_from_confusion(confusion: np.ndarray, missing: MissingClassRule) -> float:
    stats = _per_class(confusion)
    recall = stats["recall"]
    if missing == "zero":
        return float(np.nan_to_num(recall, nan=0.0).mean())
    if missing != "skip":
        raise ValueError(f"missing must be 'skip' or 'zero', got {missing!r}")
    return float(np.nanmean(recall))  # at least one class has support: inputs are non-empty


def _macro_f1_from_confusion(confusion: np.ndarray) -> float:
    stats = _per_class(confusion)
    present = (stats["support"] > 0) | (stats["predicted"] > 0)
    # 2TP / (2TP + FP + FN) is defined for every present class (its denominator is > 0); it is 0
    # when there is no true positive.
    return float(stats["f1"][present].mean())


def unweighted_accuracy(
    y_true: Any, y_pred: Any, n_classes: int, *, missing: MissingClassRule = "skip"
) -> float:
    """Mean per-class recall. ``missing="skip"`` averages over classes with support (default);
    ``missing="zero"`` counts a class without support as recall 0 (AFTER's convention)."""
    return _ua_from_confusion(confusion_matrix(y_true, y_pred, n_classes), missing)


def weighted_accuracy(y_true: Any, y_pred: Any, n_classes: int) -> float:
    """Overall accuracy: correct predictions / all predictions."""
    confusion = confusion_matrix(y_true, y_pred, n_classes)
    return float(np.trace(confusion) / confusion.sum())


def macro_f1(y_true: Any, y_pred: Any, n_classes: int) -> float:
    """Mean F1 over classes present in ``y_true`` or ``y_pred``; F1 is 0 without a true positive."""
    return _macro_f1_from_confusion(confusion_matrix(y_true, y_pred, n_classes))


def _none_if_nan(value: float) -> float | None:
    return None if np.isnan(value) else float(value)


def classification_report(
    y_true: Any,
    y_pred: Any,
    class_names: Sequence[str],
    *,
    missing: MissingClassRule = "skip",
) -> dict[str, Any]:
    """All metrics of one evaluation as plain data (JSON-ready).

    Keys: ``ua``, ``ua_missing_as_zero`` (AFTER's convention, for comparison), ``wa``,
    ``macro_f1``, ``n``, ``class_names``, ``per_class`` (name -> recall / precision / f1 /
    support; recall is None without support, precision None when never predicted, f1 None when
    the class occurs in neither), and ``confusion`` (nested lists, rows = true class).
    """
    names = [str(name) for name in class_names]
    confusion = confusion_matrix(y_true, y_pred, len(names))
    stats = _per_class(confusion)
    present = (stats["support"] > 0) | (stats["predicted"] > 0)
    per_class: dict[str, dict[str, Any]] = {}
    for index, name in enumerate(names):
        f1 = stats["f1"][index] if present[index] else np.nan
        per_class[name] = {
            "recall": _none_if_nan(stats["recall"][index]),
            "precision": _none_if_nan(stats["precision"][index]),
            "f1": _none_if_nan(f1),
            "support": int(stats["support"][index]),
        }
    return {
        "ua": _ua_from_confusion(confusion, missing),
        "ua_missing_as_zero": _ua_from_confusion(confusion, "zero"),
        "wa": float(np.trace(confusion) / confusion.sum()),
        "macro_f1": _macro_f1_from_confusion(confusion),
        "n": int(confusion.sum()),
        "class_names": names,
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }


# The area under a learning curve: what AULC in reports and `after-ray bench al` is.
def area_under_curve(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under ``values`` over ``fractions``, divided by the fraction range.

    The result is on the metric's scale: a constant curve at v gives v, whatever the range.
    Points are sorted by fraction first. A single point (zero range) gives its value, the limit
    of the normalised area. Raises ValueError for empty, mismatched or non-finite input.
    """
    x = np.asarray(fractions, dtype=float)
    y = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(
            f"fractions and values must be 1-D and of equal length, got {x.shape} and {y.shape}"
        )
    if x.size == 0:
        raise ValueError("area_under_curve needs at least one point")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("area_under_curve needs finite fractions and values (drop missing ones)")
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    span = x[-1] - x[0]
    if span == 0:
        return float(y.mean())
    return float(np.trapezoid(y, x) / span)

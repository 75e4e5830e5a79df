"""Load test of the selection path at pool scale: the scoring cache on disk -> pool -> selection -> run state.

What one run of :func:`run_load_benchmark` does, in a fresh subprocess (so that the peak resident
memory it reports is this benchmark's, not the caller's):

1. ``write``: synthesizes ``n`` utterance records chunk by chunk (utt_id, class probabilities
   ``[n, n_classes]``, embeddings ``[n, d]``, penultimate features ``[n, d // 2]``; Gaussian
   blobs of ~1,000 rows, so k-center has structure to find) and writes them as the scoring
   stage's cache (:class:`~after_ray.store.score_cache.ScoresCacheWriter`: one Parquet file of
   ``fixed_size_list<float32>`` vectors in bounded row groups).
2. ``read``: reads them back with the scoring stage's own reader
   (:func:`~after_ray.store.score_cache.read_scores`: each column streamed into a preallocated
   matrix in ``utt_id`` order) and builds the :class:`~after_ray.al.pool.PoolView`.
3. For each strategy (``after``: entropy pre-filter + k-center; ``coreset``: k-center over the
   whole pool) and each of ``rounds`` rounds, in its own run directory: ``select`` (``k`` items
   given everything labeled so far) and ``record`` (``RunState.record_selection`` then
   ``append_labels`` of the ``k`` items with a simulated label, the blob's class).

Per phase it records the wall time and the peak resident memory *of that phase* (``VmHWM`` after
resetting it through ``/proc/self/clear_refs`` at the phase start; where that is not allowed the
figure is the process peak so far). The numpy core is all it imports: no torch, no Ray.

The baseline, in a second subprocess that imports the same modules and reads the same cache:
the whole-table reader (``pyarrow.parquet.read_table`` of the cache file, ``to_numpy`` of each
vector column, ``np.stack``, rows sorted by ``utt_id``), then
the same ``PoolView``. Its read phase is timed and measured the same way as ours, and the arrays
both readers produce must be identical (a digest of ids and matrices is compared).

``after-ray bench load`` (or ``python -m after_ray.bench.load``; defaults n=200,000, d=128,
k=2,000, two rounds) prints the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from after_ray.bench.select import _status_kb  # the /proc/self/status reader

__all__ = ["run_load_benchmark"]

_MARK = "LOAD_BENCH_RESULT "
_CHUNK_ROWS = 50_000
_BLOB_ROWS = 1_000
STRATEGIES = ("after", "coreset")
FIELDS = ("embedding", "penultimate", "probs")
READ_PHASE = "read score cache + pool"
BASELINE_NAME = "read_table + to_numpy + np.stack"


# ---------------------------------------------------------------------------- memory and time


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class _Phases:
    """Wall time and peak RSS of named phases, in order."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.peak_resets = True

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.peak_resets &= _reset_peak()
        rss_before = _status_kb("VmRSS") / 1024
        start = time.perf_counter()
        yield
        self.rows.append(
            {
                "phase": name,
                "seconds": time.perf_counter() - start,
                "rss_before_mb": rss_before,
                "peak_rss_mb": _status_kb("VmHWM") / 1024,
                "rss_after_mb": _status_kb("VmRSS") / 1024,
            }
        )


# ---------------------------------------------------------------------------- synthetic pool


def utt_id(i: int) -> str:
    # Speakers interleave, so sorting by utt_id permutes the generation order (as a real
    # manifest would): reading back exercises the scatter into utt_id order.
    return f"bench/spk{(i * 7919) % 997:03d}/utt{i:07d}"


def _write_pool(out: Path, n: int, d: int, n_classes: int, seed: int) -> np.ndarray:
    """Write the scoring cache; returns each row's true class (the simulated oracle's answer)."""
    from after_ray.store.score_cache import ScoresCacheWriter

    rng = np.random.default_rng(seed)
    n_blobs = max(2, n // _BLOB_ROWS)
    centers = rng.standard_normal((n_blobs, d), dtype=np.float32)
    blob_logits = rng.standard_normal((n_blobs, n_classes)).astype(np.float32) * 3
    # float32 throughout (a float64 scalar here would make the penultimate vectors float64).
    projection = rng.standard_normal((d, max(1, d // 2)), dtype=np.float32)
    projection /= np.float32(np.sqrt(d))
    truth = np.empty(n, dtype=np.int16)
    # The cache the scoring stage writes (no MC-dropout samples), one chunk at a time so that
    # generating the pool never holds more than a chunk.
    with ScoresCacheWriter(out, (0, n_classes)) as writer:
        for start in range(0, n, _CHUNK_ROWS):
            m = min(n, start + _CHUNK_ROWS) - start
            blob = rng.integers(0, n_blobs, m)
            x = rng.standard_normal((m, d), dtype=np.float32)
            x *= 0.3
            x += centers[blob]
            logits = blob_logits[blob] + rng.standard_normal((m, n_classes)).astype(np.float32)
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits)
            probs /= probs.sum(axis=1, keepdims=True)
            penultimate = np.maximum(x @ projection, 0.0)
            truth[start : start + m] = blob_logits[blob].argmax(axis=1)
            writer.add(
                [utt_id(i) for i in range(start, start + m)],
                {"probs": probs, "embedding": x, "penultimate": penultimate},
            )
    return truth


def _read_pool(out: Path, n_classes: int):
    """Our reader: the scoring stage's own (``score_cache.read_scores``)."""
    from after_ray.store.score_cache import read_scores

    scores = read_scores(out)
    if scores is None or scores.probs.shape[1] != n_classes:
        raise RuntimeError(f"the score cache in {out} is incomplete or has the wrong classes")
    return scores.utt_ids.astype(str), scores.embedding, scores.penultimate, scores.probs


def _read_pool_baseline(out: Path, n_classes: int):
    """The baseline reader: the cache file as one Arrow table, each vector column turned into
    an object array of per-row arrays and stacked, rows sorted by utt_id (what a first
    implementation looks like)."""
    import pyarrow.parquet as pq

    from after_ray.store.score_cache import SCORES_FILE

    table = pq.read_table(out / SCORES_FILE)
    ids = np.asarray(table.column("utt_id").to_pylist(), dtype=object)
    order = np.argsort(ids.astype(str), kind="stable")
    matrices = []
    for field in FIELDS:
        matrix = np.stack(table.column(field).to_numpy(zero_copy_only=False))
        matrices.append(matrix.astype(np.float32, copy=False)[order])
    del table
    embeddings, penultimate, probs = matrices
    if probs.shape[1] != n_classes:
        raise RuntimeError(f"probs have {probs.shape[1]} classes, expected {n_classes}")
    return ids[order].astype(str), embeddings, penultimate, probs


def _digest(*arrays: np.ndarray) -> str:
    """One hash over the ids and matrices: both readers must produce exactly the same pool."""
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes() if array.dtype.kind != "U" else "\n".join(array).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------- child side


def _import_selection_modules():
    # Both children import these before their first phase, so that no phase is charged for
    # importing FAISS or Arrow and their baseline RSS is the same.
    import pyarrow.parquet  # noqa: F401

    import after_ray.al.kernels.kcenter  # noqa: F401
    import after_ray.store.embedding_store  # noqa: F401
    import after_ray.store.score_cache  # noqa: F401
    from after_ray.al.pool import PoolView
    from after_ray.al.strategies import get_strategy
    from after_ray.store.run_state import RunState

    return PoolView, RunState, get_strategy


def _baseline_child(spec: dict) -> dict:
    """The baseline reader over the cache ``_child`` wrote, measured like our read phase."""
    PoolView, _, _ = _import_selection_modules()
    n = spec["n"]
    out = Path(spec["out_dir"])
    baseline_mb = _status_kb("VmRSS") / 1024
    phases = _Phases()
    with phases.phase(READ_PHASE):
        ids, embeddings, penultimate, probs = _read_pool_baseline(out / "scores", spec["n_classes"])
        PoolView(
            utt_ids=ids,
            labeled=np.zeros(n, dtype=bool),
            probs=probs,
            embeddings=embeddings,
            penultimate=penultimate,
        )
    return {
        "name": BASELINE_NAME,
        "phases": phases.rows,
        "per_phase_peaks": phases.peak_resets,
        "baseline_rss_mb": baseline_mb,
        "read_digest": _digest(ids, embeddings, penultimate, probs),
    }


def _child(spec: dict) -> dict:
    PoolView, RunState, get_strategy = _import_selection_modules()

    n, d, n_classes, k = spec["n"], spec["d"], spec["n_classes"], spec["k"]
    rounds, seed = spec["rounds"], spec["seed"]
    out = Path(spec["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    baseline_mb = _status_kb("VmRSS") / 1024
    phases = _Phases()

    with phases.phase("write score cache"):
        truth = _write_pool(out / "scores", n, d, n_classes, seed)
    with phases.phase(READ_PHASE):
        ids, embeddings, penultimate, probs = _read_pool(out / "scores", n_classes)
        pool = PoolView(
            utt_ids=ids,
            labeled=np.zeros(n, dtype=bool),
            probs=probs,
            embeddings=embeddings,
            penultimate=penultimate,
        )
        # The simulated oracle answers by utt_id: the generation index is in the id.
        index_of = np.fromiter((int(u[-7:]) for u in ids), dtype=np.int64, count=n)
    read_digest = _digest(ids, embeddings, penultimate, probs)  # outside the timed phase
    classes = [f"class{c}" for c in range(n_classes)]

    selections: dict[str, list[list[str]]] = {}
    run_dirs: dict[str, str] = {}
    for name in STRATEGIES:
        strategy = get_strategy(name)
        run_dir = out / "runs" / name
        run_dirs[name] = str(run_dir)
        selections[name] = []
        labeled = np.zeros(n, dtype=bool)
        with RunState.open(run_dir) as state:
            for r in range(rounds):
                with phases.phase(f"select {name} r{r}"):
                    picks = strategy.select(pool.with_labeled(labeled), k, seed=seed + r)
                with phases.phase(f"record {name} r{r}"):
                    positions = np.searchsorted(ids, picks)
                    state.record_selection(r, picks, None, name)
                    state.append_labels(
                        r,
                        (
                            {
                                "utt_id": u,
                                "label": classes[int(truth[index_of[p]])],
                                "source": "simulated",
                            }
                            for u, p in zip(picks, positions.tolist(), strict=True)
                        ),
                    )
                labeled[positions] = True
                selections[name].append(picks)

    matrix_mb = n * d * 4 / 2**20
    return {
        **{key: spec[key] for key in ("n", "d", "n_classes", "k", "rounds", "seed")},
        "phases": phases.rows,
        "per_phase_peaks": phases.peak_resets,
        "peak_rss_mb": max(row["peak_rss_mb"] for row in phases.rows),
        "baseline_rss_mb": baseline_mb,
        "matrix_mb": matrix_mb,
        "pool_arrays_mb": (embeddings.nbytes + penultimate.nbytes + probs.nbytes) / 2**20,
        "selection_sizes": {name: [len(s) for s in sel] for name, sel in selections.items()},
        "duplicates_across_rounds": {
            name: sum(len(s) for s in sel) - len({u for s in sel for u in s})
            for name, sel in selections.items()
        },
        "run_dirs": run_dirs,
        "read_digest": read_digest,
    }


# ---------------------------------------------------------------------------- parent side


def _read_comparison(result: dict) -> list[str]:
    """Our read phase against the baseline reader's, as printed lines."""
    base = result.get("baseline")
    if base is None:
        return []
    ours = next(r for r in result["phases"] if r["phase"] == READ_PHASE)
    theirs = next(r for r in base["phases"] if r["phase"] == READ_PHASE)
    pool_mb = result["pool_arrays_mb"]
    w = 44
    lines = [
        "",
        f"read score cache -> pool ({pool_mb:.0f} MB of pool arrays), ours vs the baseline reader, "
        "each in its own process:",
        f"{'method':<{w}} {'time (s)':>9} {'peak RSS (MB)':>14} {'peak - RSS at start (MB)':>25}",
    ]
    for label, row in (
        ("ours (batches into preallocated arrays)", ours),
        (f"baseline ({base['name']})", theirs),
    ):
        lines.append(
            f"{label:<{w}} {row['seconds']:>9.2f} {row['peak_rss_mb']:>14.0f} "
            f"{row['peak_rss_mb'] - row['rss_before_mb']:>25.0f}"
        )
    speedup = theirs["seconds"] / ours["seconds"] if ours["seconds"] > 0 else float("inf")
    lines.append(
        f"speed-up: {speedup:.1f}x   check: same pool arrays from both readers: "
        f"{result['read_equal']}"
    )
    if not base["per_phase_peaks"]:
        lines.append("(this kernel does not reset VmHWM: the baseline's peak is cumulative)")
    return lines


def format_table(result: dict) -> str:
    lines = [
        f"load benchmark: n={result['n']:,} d={result['d']} classes={result['n_classes']} "
        f"k={result['k']} rounds={result['rounds']}; embedding matrix "
        f"{result['matrix_mb']:.0f} MB, pool arrays {result['pool_arrays_mb']:.0f} MB, "
        f"RSS after imports {result['baseline_rss_mb']:.0f} MB",
        "",
        "| phase | wall (s) | peak RSS in phase (MB) | RSS after (MB) |",
        "|---|---:|---:|---:|",
    ]
    for row in result["phases"]:
        lines.append(
            f"| {row['phase']} | {row['seconds']:.2f} | {row['peak_rss_mb']:.0f} "
            f"| {row['rss_after_mb']:.0f} |"
        )
    lines.append(
        f"| **whole run (peak)** | {sum(r['seconds'] for r in result['phases']):.2f} "
        f"| {result['peak_rss_mb']:.0f} | |"
    )
    if not result["per_phase_peaks"]:
        lines.append("(this kernel does not reset VmHWM: peaks are cumulative)")
    lines += _read_comparison(result)
    return "\n".join(lines)


def _run_child(spec: dict, timeout: float | None) -> dict:
    cmd = [sys.executable, "-m", "after_ray.bench.load", "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            result = json.loads(line[len(_MARK) :])
    if proc.returncode != 0 or result is None:
        raise RuntimeError(
            f"load benchmark child ({spec['role']}) failed (exit {proc.returncode}):\n"
            f"{proc.stderr[-4000:]}"
        )
    return result


def run_load_benchmark(
    n: int = 200_000,
    d: int = 128,
    n_classes: int = 4,
    k: int = 2000,
    rounds: int = 2,
    out_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    baseline: bool = True,
    print_table: bool = True,
    timeout: float | None = None,
) -> dict:
    """Run the load benchmark in a subprocess; returns (and prints) the figures.

    ``baseline`` also runs the baseline reader over the same cache in a second subprocess
    (``result["baseline"]``; ``result["read_equal"]`` says whether both readers gave the same
    pool). ``out_dir`` keeps the cache and the two run directories (``runs/after``,
    ``runs/coreset``); None uses a temporary directory removed afterwards. ``timeout`` applies
    to each subprocess.
    """
    if min(n, d, k, rounds) < 1 or n_classes < 2:
        raise ValueError("n, d, k and rounds must be >= 1 and n_classes >= 2")
    if k * rounds > n:
        raise ValueError(f"k * rounds = {k * rounds} exceeds the pool size {n}")
    with tempfile.TemporaryDirectory(prefix="after-ray-load-") as tmp:
        spec = {
            "n": n, "d": d, "n_classes": n_classes, "k": k, "rounds": rounds, "seed": seed,
            "out_dir": str(Path(out_dir) if out_dir is not None else Path(tmp)),
        }  # fmt: skip
        result = _run_child({**spec, "role": "ours"}, timeout)
        if baseline:
            result["baseline"] = _run_child({**spec, "role": "baseline"}, timeout)
            result["read_equal"] = result["baseline"]["read_digest"] == result["read_digest"]
    if print_table:
        print(format_table(result))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m after_ray.bench.load", description=__doc__)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--n-classes", type=int, default=4)
    parser.add_argument("--k", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline reader")
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        result = _baseline_child(spec) if spec.get("role") == "baseline" else _child(spec)
        print(_MARK + json.dumps(result), flush=True)
        return 0
    run_load_benchmark(
        args.n,
        args.d,
        args.n_classes,
        args.k,
        args.rounds,
        args.out_dir,
        seed=args.seed,
        baseline=not args.no_baseline,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``after-ray bench select``: our selection kernels against the naive ones, in the same run.

Every measured method runs in its own subprocess (``python -m after_ray.bench.select --child``),
which regenerates the same seeded data, so each gets its own wall time and its own peak resident
memory (``VmHWM`` from ``/proc/self/status``; tracemalloc misses numpy/BLAS/FAISS buffers).
The peak is reported whole and above the process's baseline after imports, next to the size of
the data matrix.

Strategies and their baselines:

- ``coreset``: :func:`after_ray.al.kernels.kcenter.kcenter_greedy` (``shards > 1``: the exact Ray-sharded
  version) vs :func:`after_ray.al.kernels.reference.kcenter_greedy_naive` (one float32 pass over the pool
  per pick) run for ``naive_picks`` picks; its time for ``k`` picks is *extrapolated* as
  setup + k x (measured time per pick). The naive picks must equal our first ``naive_picks``.
- ``badge``: :func:`after_ray.al.kernels.badge.badge_kmeanspp` vs explicit BADGE (materialised
  ``[N, C*H]`` gradient embeddings, one float32 GEMV per pick), which cannot hold 1M x 4 x 768
  in memory: it is timed on a subset of rows for ``naive_picks`` picks and *extrapolated* linearly
  in rows and picks (its cost per pick is proportional to N C H). Equality is checked on a small
  subset against the float64 explicit reference for ``min(k, 200)`` picks.
- ``cluster-margin``: the strategy (``ClusterMarginSampling``: k-means on a seeded sample, chunked
  assignment, margin filter, round-robin) vs k-means on every row (FAISS Lloyd iterations over
  all N), timed for one iteration and *extrapolated* to the same number of iterations, plus the
  same assignment. The picks are approximate by design, so no equality check. (Exact average-link
  HAC, the paper's clustering, needs N^2/2 floats: 2 TB at 1M.)

Data: ``random`` (i.i.d. Gaussian) or ``clustered`` (N/1000 Gaussian blobs, spread 0.3 of the
centers' scale), generated chunk by chunk into the preallocated matrix.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np

__all__ = ["make_data", "run_select_benchmark"]

_MARK = "BENCH_RESULT "
_N_CLASSES = 4
_GEN_CHUNK = 65536


def _status_kb(field: str) -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # kB on Linux


def make_data(kind: str, n: int, d: int, seed: int, *, with_probs: bool = True):
    """``(x [n, d] float32, probs [n, 4] float32 or None)``; deterministic in the seed."""
    if kind not in ("random", "clustered"):
        raise ValueError(f"data must be 'random' or 'clustered', got {kind!r}")
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), dtype=np.float32)
    probs = np.empty((n, _N_CLASSES), dtype=np.float32) if with_probs else None
    if kind == "clustered":
        n_centers = max(2, n // 1000)
        centers = rng.standard_normal((n_centers, d), dtype=np.float32)
        center_logits = rng.standard_normal((n_centers, _N_CLASSES)).astype(np.float32) * 3
    for s in range(0, n, _GEN_CHUNK):
        m = min(n, s + _GEN_CHUNK) - s
        noise = rng.standard_normal((m, d), dtype=np.float32)
        if kind == "clustered":
            lab = rng.integers(0, n_centers, m)
            noise *= 0.3
            noise += centers[lab]
            logits = center_logits[lab] + rng.standard_normal((m, _N_CLASSES)).astype(np.float32)
        else:
            logits = rng.standard_normal((m, _N_CLASSES)).astype(np.float32) * 2
        x[s : s + m] = noise
        if with_probs:
            logits -= logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            probs[s : s + m] = e / e.sum(axis=1, keepdims=True)
    return x, probs


def _penultimate(x: np.ndarray) -> np.ndarray:
    """BADGE's penultimate features: ReLU of the generated rows, in place (no copy)."""
    np.maximum(x, 0.0, out=x)
    return x


# ---------------------------------------------------------------------------- child side
def _child(spec: dict) -> dict:
    method = spec["method"]
    n, d, k, seed = spec["n"], spec["d"], spec["k"], spec["seed"]
    base_kb = _status_kb("VmRSS")
    t_gen = time.perf_counter()
    x, probs = make_data(spec["data"], n, d, seed, with_probs=spec["strategy"] != "coreset")
    gen_s = time.perf_counter() - t_gen
    out: dict = {"method": method, "gen_s": gen_s, "matrix_bytes": int(x.nbytes)}
    t0 = time.perf_counter()
    if method == "kcenter":
        from after_ray.al.kernels.kcenter import KCenterStats, kcenter_greedy

        if spec["shards"] > 1:
            from after_ray.distributed.kcenter import sharded_kcenter_greedy
            from after_ray.distributed.session import ensure_ray

            ensure_ray(None)
            t0 = time.perf_counter()
            picks = sharded_kcenter_greedy(x, [], k, shards=spec["shards"], num_cpus_per_shard=0)
            out["note"] = "driver process only (actors and object store not included)"
        else:
            st = KCenterStats()
            picks = kcenter_greedy(x, [], k, stats=st)
            out["work"] = {key: v for key, v in vars(st).items() if key != "extra"} | st.extra
        out["picks"] = picks.tolist()
    elif method == "kcenter_naive":
        from after_ray.al.kernels.reference import kcenter_greedy_naive

        tm: dict = {}
        picks = kcenter_greedy_naive(x, [], spec["naive_picks"], timings=tm)
        out["picks"] = picks.tolist()
        out["timings"] = tm
    elif method == "badge":
        from after_ray.al.kernels.badge import BadgeStats, badge_kmeanspp

        st = BadgeStats()
        picks = badge_kmeanspp(probs, _penultimate(x), k, seed=seed, stats=st)
        out["picks"] = picks.tolist()
        out["work"] = vars(st)
    elif method == "badge_explicit":
        from after_ray.al.kernels.badge import badge_kmeanspp
        from after_ray.al.kernels.reference import badge_kmeanspp_explicit, gradient_embedding

        h = _penultimate(x)
        # Equality on a small subset, float64 reference.
        small = min(n, 4000)
        kk = min(k, 200, small)
        ours = badge_kmeanspp(probs[:small], h[:small], kk, seed=seed)
        ref = badge_kmeanspp_explicit(probs[:small], h[:small], kk, seed=seed)
        out["equal_small"] = {"rows": small, "picks": kk, "equal": bool(np.array_equal(ours, ref))}
        sub = spec["subset"]
        t_mat = time.perf_counter()
        g = gradient_embedding(probs[:sub], h[:sub]).astype(np.float32)
        mat_s = time.perf_counter() - t_mat
        t0 = time.perf_counter()
        badge_kmeanspp_explicit(
            probs[:sub], h[:sub], spec["naive_picks"] + 1, seed=seed, g=g, method="gemv"
        )
        out["timings"] = {
            "subset_rows": sub,
            "materialise_s": mat_s,
            "picks_s": time.perf_counter() - t0,
            "timed_picks": spec["naive_picks"],
            "g_bytes_full": int(n) * probs.shape[1] * d * 4,
        }
    elif method == "cluster_margin":
        from after_ray.al.pool import PoolView
        from after_ray.al.strategies.cluster_margin import ClusterMarginSampling

        ids = np.char.add("u", np.arange(n).astype(str))
        pool = PoolView(utt_ids=ids, labeled=np.zeros(n, dtype=bool), probs=probs, embeddings=x)
        t0 = time.perf_counter()
        picks = ClusterMarginSampling().select(pool, k, seed=seed)
        out["picks_count"] = len(picks)
    elif method == "kmeans_full":
        import faiss

        from after_ray.al.kernels.clustering import cluster_assign
        from after_ray.al.strategies.cluster_margin import default_n_clusters

        n_clusters = default_n_clusters(n)
        km = faiss.Kmeans(
            d, n_clusters, niter=1, seed=seed, max_points_per_centroid=n, verbose=False
        )
        km.train(x)
        iter_s = time.perf_counter() - t0
        t_assign = time.perf_counter()
        cluster_assign(x, km.centroids)
        out["timings"] = {
            "iter_s": iter_s,
            "assign_s": time.perf_counter() - t_assign,
            "n_clusters": n_clusters,
        }
    else:
        raise ValueError(f"unknown method {method!r}")
    out["wall_s"] = time.perf_counter() - t0
    out["peak_kb"] = _status_kb("VmHWM")
    out["base_kb"] = base_kb
    return out


def _run_child(spec: dict, timeout: float | None = None) -> dict:
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "after_ray.bench.select", "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith(_MARK):
            return json.loads(line[len(_MARK) :])
    raise RuntimeError(
        f"benchmark child {spec['method']} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    )


# ---------------------------------------------------------------------------- parent side
def _machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError):
        mem_gb = float("nan")
    return f"{os.cpu_count()} CPU(s), {model}, {mem_gb:.0f} GB RAM"


def _gb(kb: int) -> float:
    return kb * 1024 / 1e9


def run_select_benchmark(
    n: int = 1_000_000,
    d: int = 768,
    k: int = 10_000,
    strategy: str = "coreset",
    shards: int = 1,
    data: str = "random",
    naive_picks: int = 20,
    seed: int = 0,
    *,
    badge_subset: int = 50_000,
    print_table: bool = True,
) -> dict:
    """Run the benchmark described in the module docstring; returns (and prints) the figures."""
    if strategy not in ("coreset", "badge", "cluster-margin"):
        raise ValueError(f"strategy must be coreset, badge or cluster-margin; got {strategy!r}")
    if shards > 1 and strategy != "coreset":
        raise ValueError("shards > 1 applies to the coreset strategy only")
    base = {"n": n, "d": d, "k": k, "seed": seed, "data": data, "strategy": strategy}
    base |= {"shards": shards, "naive_picks": max(2, int(naive_picks))}
    result: dict = {**base, "machine": _machine()}
    if strategy == "coreset":
        ours = _run_child({**base, "method": "kcenter"})
        naive = _run_child({**base, "method": "kcenter_naive"})
        tm = naive["timings"]
        per_pick = tm["picks_s"] / max(tm["timed_picks"], 1)
        extrap = tm["setup_s"] + per_pick * (k - (naive_picks - tm["timed_picks"]))
        m = len(naive["picks"])
        equal = ours["picks"][:m] == naive["picks"]
        baseline = {
            "name": "naive greedy (one float32 pass per pick)",
            "measured": f"{naive_picks} picks in {naive['wall_s']:.1f} s "
            f"(setup {tm['setup_s']:.2f} s, {per_pick * 1e3:.0f} ms/pick)",
            "time_s": extrap,
            "extrapolated": True,
        }
        check = f"first {m} picks equal: {equal}"
        result["picks_equal_prefix"] = bool(equal)
    elif strategy == "badge":
        sub = min(n, int(badge_subset))
        ours = _run_child({**base, "method": "badge"})
        naive = _run_child({**base, "method": "badge_explicit", "subset": sub})
        tm = naive["timings"]
        per_pick = tm["picks_s"] / tm["timed_picks"] * (n / sub)
        extrap = tm["materialise_s"] * (n / sub) + per_pick * k
        baseline = {
            "name": "explicit BADGE ([N, C*H] float32 g, GEMV per pick)",
            "measured": f"{tm['timed_picks']} picks on {sub} rows in {tm['picks_s']:.1f} s "
            f"(+{tm['materialise_s']:.1f} s to build g); g at full size: "
            f"{tm['g_bytes_full'] / 1e9:.1f} GB",
            "time_s": extrap,
            "extrapolated": True,
        }
        eq = naive["equal_small"]
        check = (
            f"equal to float64 explicit on {eq['rows']} rows x {eq['picks']} picks: {eq['equal']}"
        )
        result["picks_equal_prefix"] = eq["equal"]
    else:
        ours = _run_child({**base, "method": "cluster_margin"})
        naive = _run_child({**base, "method": "kmeans_full"})
        tm = naive["timings"]
        extrap = tm["iter_s"] * 20 + tm["assign_s"]
        baseline = {
            "name": f"k-means on all rows ({tm['n_clusters']} clusters, 20 Lloyd iterations)",
            "measured": f"1 iteration {tm['iter_s']:.1f} s + assignment {tm['assign_s']:.1f} s",
            "time_s": extrap,
            "extrapolated": True,
        }
        check = "approximate by design (no equality check)"
        result["picks_equal_prefix"] = None
    matrix_gb = ours["matrix_bytes"] / 1e9
    result["matrix_gb"] = matrix_gb
    result["ours"] = {
        "time_s": ours["wall_s"],
        "peak_gb": _gb(ours["peak_kb"]),
        "peak_over_base_gb": _gb(ours["peak_kb"] - ours["base_kb"]),
        "work": ours.get("work"),
        "note": ours.get("note"),
    }
    baseline["peak_gb"] = _gb(naive["peak_kb"])
    baseline["peak_over_base_gb"] = _gb(naive["peak_kb"] - naive["base_kb"])
    result["baseline"] = baseline
    result["speedup"] = extrap / ours["wall_s"] if ours["wall_s"] > 0 else math.inf
    result["check"] = check
    if print_table:
        _print(result)
    return result


def _print(r: dict) -> None:
    o, b = r["ours"], r["baseline"]
    print(
        f"select benchmark: strategy={r['strategy']} n={r['n']} d={r['d']} k={r['k']} "
        f"data={r['data']} shards={r['shards']} seed={r['seed']}"
    )
    print(f"machine: {r['machine']}; data matrix {r['matrix_gb']:.2f} GB")
    w = 44
    print(f"{'method':<{w}} {'time (s)':>12} {'peak RSS (GB)':>14} {'x matrix':>9}")
    print(
        f"{'ours':<{w}} {o['time_s']:>12.1f} {o['peak_gb']:>14.2f} "
        f"{o['peak_gb'] / r['matrix_gb']:>9.2f}"
    )
    label = b["name"][:w]
    star = "*" if b["extrapolated"] else ""
    print(
        f"{label:<{w}} {b['time_s']:>11.1f}{star} {b['peak_gb']:>14.2f} "
        f"{b['peak_gb'] / r['matrix_gb']:>9.2f}"
    )
    print(f"speed-up: {r['speedup']:.1f}x   check: {r['check']}")
    print(f"* extrapolated from: {b['measured']}")
    if o.get("note"):
        print(f"ours: {o['note']}")
    if o.get("work"):
        print(f"ours, work done: {o['work']}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        res = _child(json.loads(sys.argv[2]))
        print(_MARK + json.dumps(res), flush=True)
    else:
        import argparse

        ap = argparse.ArgumentParser(description="select benchmark (see after-ray bench select)")
        ap.add_argument("--n", type=int, default=1_000_000)
        ap.add_argument("--d", type=int, default=768)
        ap.add_argument("--k", type=int, default=10_000)
        ap.add_argument("--strategy", default="coreset")
        ap.add_argument("--shards", type=int, default=1)
        ap.add_argument("--data", default="random")
        ap.add_argument("--naive-picks", type=int, default=20)
        ap.add_argument("--seed", type=int, default=0)
        a = ap.parse_args()
        run_select_benchmark(a.n, a.d, a.k, a.strategy, a.shards, a.data, a.naive_picks, a.seed)

"""Ray job: the whole AFTER active-learning loop (TAPT, cold start, rounds); resumes where it stopped.

ray job submit --working-dir . -- python jobs/run_al.py --config configs/iemocap.yaml ray.num_workers=4 ray.use_gpu=true [KEY=VALUE ...]

On a cluster see docs/cluster.md (address, token, run.output_dir on shared storage).
"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("run"))

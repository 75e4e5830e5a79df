"""Ray job: a Ray Tune sweep over strategies and budgets, one AL run per trial.

ray job submit --working-dir . -- python jobs/sweep.py --config configs/iemocap.yaml \
    --axis al.strategy=after,random --axis run.seed=0,1,2 [KEY=VALUE ...]

On a cluster see docs/cluster.md (address, token, run.output_dir on shared storage).
"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("sweep"))

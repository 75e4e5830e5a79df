"""Ray job: fine-tune on the whole labeled pool, the full-data reference (Ray Train).

ray job submit --working-dir . -- python jobs/finetune.py --config configs/iemocap.yaml ray.num_workers=4 ray.use_gpu=true [KEY=VALUE ...]

On a cluster see docs/cluster.md (address, token, run.output_dir on shared storage).
"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("finetune"))

"""Ray job: Markdown report with learning curves (UA / WA / macro-F1 per round) for run directories.

ray job submit --working-dir . -- python jobs/report.py /mnt/shared/runs/<run> [<run> ...] [--reference <full-data run>] [--out DIR]

On a cluster see docs/cluster.md (address, token, run directories on shared storage).
"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("report"))

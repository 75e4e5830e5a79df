"""Ray job: corpus -> manifest + quarantine.

ray job submit --working-dir . -- python jobs/prepare.py --config configs/iemocap.yaml [KEY=VALUE ...]
"""

from _entry import run

if __name__ == "__main__":
    raise SystemExit(run("prepare"))

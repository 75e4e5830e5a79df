"""Shared by the job scripts: make the package importable from a `--working-dir .` upload.

`ray job submit --working-dir .` unpacks the repository and runs `python jobs/<stage>.py` from its
root; Python then puts `jobs/` (not the root) on sys.path, so the root is added here. When the
package is pip-installed on the cluster (cluster.yaml's setup commands) this changes nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path


def run(command: str) -> int:
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from after_ray.cli import main

    return main([command, *sys.argv[1:]])

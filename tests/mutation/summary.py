"""Summary of the last `mutmut run` (`make mutation`): mutants per file, killed, survived, %.

Reads mutmut's per-file results (``mutants/**/*.py.meta``) and ``equivalent.txt`` next to this
file: surviving mutants that change no observable behaviour, one per line as
``<mutant name>  <reason>``. Those leave the denominator; every other survivor counts. A listed
mutant that no longer survives, or no longer exists, is reported so the list cannot go stale.

Run from the repository root: ``.venv/bin/python tests/mutation/summary.py``.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

# mutmut's exit codes (mutmut.stats.status_by_exit_code), kept here so the summary reads the
# results without importing mutmut's configuration.
KILLED = {1, 3}
TIMEOUT = {-24, 24, 152, 255, 36}
SURVIVED = {0}
NO_TESTS = {5, 33}
NOT_CHECKED = {None}

ROOT = Path(__file__).resolve().parents[2]
EQUIVALENT = Path(__file__).with_name("equivalent.txt")


def _equivalents() -> dict[str, str]:
    out: dict[str, str] = {}
    if not EQUIVALENT.exists():
        return out
    for line in EQUIVALENT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, reason = line.partition(" ")
            out[name] = reason.strip()
    return out


def main() -> int:
    metas = sorted((ROOT / "mutants").rglob("*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/: run `make mutation` first")
        return 1
    equivalent = _equivalents()
    seen: set[str] = set()
    rows, total = [], Counter()
    stale = []
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        c = Counter()
        for name, code in codes.items():
            seen.add(name)
            c["total"] += 1
            if code in KILLED:
                c["killed"] += 1
            elif code in TIMEOUT:
                c["timeout"] += 1
            elif code in NOT_CHECKED:
                c["not_checked"] += 1
            elif name in equivalent and code in SURVIVED:
                c["equivalent"] += 1
            elif code in SURVIVED:
                c["survived"] += 1
            elif code in NO_TESTS:
                c["no_tests"] += 1
            else:
                c["other"] += 1
            if name in equivalent and code not in SURVIVED:
                stale.append(f"{name} (now {code})")
        rows.append((str(meta.relative_to(ROOT / "mutants"))[: -len(".meta")], c))
        total.update(c)
    stale += [f"{name} (no such mutant)" for name in equivalent if name not in seen]

    def pct(c: Counter) -> float:
        live = c["survived"] + c["no_tests"] + c["other"]
        return 100.0 * live / max(1, c["total"] - c["equivalent"])

    cols = ("total", "killed", "timeout", "survived", "no_tests", "equivalent")
    print(f"{'file':44s}" + "".join(f"{k:>11s}" for k in cols) + f"{'survival':>10s}")
    for path, c in rows + [("ALL", total)]:
        print(f"{path:44s}" + "".join(f"{c[k]:11d}" for k in cols) + f"{pct(c):9.1f}%")
    if total["not_checked"]:
        print(f"{total['not_checked']} mutants were not checked (interrupted run?)")
    if stale:
        print("equivalent.txt lists mutants that no longer survive:\n  " + "\n  ".join(stale))
    print(
        f"\nsurvival: {pct(total):.1f}% = (survived {total['survived']} + no tests "
        f"{total['no_tests']} + other {total['other']}) / (total {total['total']} - equivalent "
        f"{total['equivalent']}); killed {total['killed']}, timeout {total['timeout']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

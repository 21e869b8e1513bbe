"""``python tests/learning_spread.py DIR`` -> a Markdown table of what every learning test recorded in DIR
(``ALIGNLAB_RECORD=DIR``, one JSON per test, seed and thread count): per test and quantity, the mean +- std
over the runs, the minimum and the maximum, and the runs counted. ``make learning-spread`` writes it to
results/learning/spread.md."""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def main(root: str) -> None:
    runs = defaultdict(list)
    for f in sorted(Path(root).glob("*.json")):
        r = json.loads(f.read_text())
        runs[r["test"].split("[")[0]].append(r)
    print("| test | quantity | mean +- std | min | max | runs (seeds x threads) |")
    print("|---|---|---:|---:|---:|---|")
    for test, rows in sorted(runs.items()):
        threads = sorted({r.get("threads", 1) for r in rows})
        keys = [k for k in rows[0] if k not in ("test", "threads")]
        pairs = [("end", "start"), ("sampled_end", "sampled_start"), ("length_end", "length_start")]
        gains = {f"{a} - {b}": [r[a] - r[b] for r in rows] for a, b in pairs if a in rows[0] and b in rows[0]}
        for k, values in [*((k, [r[k] for r in rows]) for k in keys), *gains.items()]:
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            print(f"| `{test}` | {k} | {statistics.mean(values):.3f} +- {sd:.3f} | {min(values):.3f} | "
                  f"{max(values):.3f} | {len(rows)} (threads {', '.join(map(str, threads))}) |")


if __name__ == "__main__":
    main(sys.argv[1])

"""Before/after table of ``bench.step`` runs: each row's ratio to fused AdamW, per run.

    python -m memopt.recipes.bench.step_diff --before B1.json B2.json --after A1.json A2.json
        [--key vs_fused_adamw] [--check]

Each file is a ``bench.step --out`` JSON; the runs of one side are repeats of the same
command (interleave them with the other side's on the same machine). A row's verdict:
"worse" when its best run after is slower than its worst run before by more than the larger
of the two sides' spreads (max - min over runs), "better" in the mirror case, else "within
spread". A row missing on one side is listed with "-". ``--check`` exits 1 when a memopt row
is "worse".
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def load_rows(path: str) -> dict[str, dict[str, Any]]:
    """optimizer name -> row, from a ``bench.step --out`` file."""
    with open(path) as f:
        payload = json.load(f)
    rows = payload["rows"] if isinstance(payload, dict) else payload
    return {row["optimizer"]: row for row in rows}


def verdict(before: list[float], after: list[float]) -> str:
    """Compare two sets of repeated measurements (lower is better) against their spread."""
    if not before or not after:
        return "-"
    spread = max(max(before) - min(before), max(after) - min(after))
    if min(after) - max(before) > spread:
        return "worse"
    if min(before) - max(after) > spread:
        return "better"
    return "within spread"


def diff_rows(before: list[dict[str, dict[str, Any]]], after: list[dict[str, dict[str, Any]]],
              key: str) -> list[dict[str, str]]:
    """One table row per optimizer present on either side, in first-seen order."""
    names = list(dict.fromkeys([n for run in before + after for n in run]))
    out = []
    for name in names:
        b = [run[name][key] for run in before if name in run and run[name].get(key) is not None]
        a = [run[name][key] for run in after if name in run and run[name].get(key) is not None]
        change = f"{(sum(a) / len(a)) / (sum(b) / len(b)) - 1:+.1%}" if a and b else "-"
        out.append({"optimizer": name,
                    "before": " / ".join(f"{v:.3f}" for v in b) or "-",
                    "after": " / ".join(f"{v:.3f}" for v in a) or "-",
                    "change of the mean": change, "verdict": verdict(b, a)})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}",
                                description=__doc__.splitlines()[0])
    p.add_argument("--before", nargs="+", required=True, help="bench.step JSON files, before")
    p.add_argument("--after", nargs="+", required=True, help="bench.step JSON files, after")
    p.add_argument("--key", default="vs_fused_adamw", help="row field to compare")
    p.add_argument("--check", action="store_true", help="exit 1 if a memopt row is worse")
    args = p.parse_args(argv)
    rows = diff_rows([load_rows(f) for f in args.before], [load_rows(f) for f in args.after],
                     args.key)
    columns = ["optimizer", "before", "after", "change of the mean", "verdict"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(row[c] for c in columns) + " |")
    worse = [r["optimizer"] for r in rows
             if r["verdict"] == "worse" and r["optimizer"].startswith("memopt")]
    if worse:
        print(f"\nworse beyond the spread: {', '.join(worse)}")
    return 1 if args.check and worse else 0


if __name__ == "__main__":
    raise SystemExit(main())

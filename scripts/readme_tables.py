"""Write README.md's demo tables from the JSON files `lepton-fast demo --json` wrote.

    lepton-fast demo --task digits --seeds 0 1 2 --json benchmarks/demo/digits.json
    python scripts/readme_tables.py benchmarks/demo/digits.json      # rewrites README.md
    python scripts/readme_tables.py --check benchmarks/demo/*.json   # exit 1 if README differs

Each table sits between ``<!-- demo-table:TASK -->`` and ``<!-- /demo-table:TASK -->`` in
README.md, so a re-measured run replaces its table and nothing else. The JSON files kept in
benchmarks/demo/ are the runs behind the README's figures; tests/test_readme.py checks that
the tables are what they render to.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
METRICS = ("accuracy", "macro_recall", "macro_f1")
ADAPTED_FROM = 2  # rows after the source-only teacher and the target-supervised bound are adapted students


def markdown_table(run: dict) -> str:
    """The run's table: mean ± std (percent) per row, the best adapted accuracy in bold, and
    each row's mean wall seconds (load-dependent: the README says under which load)."""
    table = run["table"]
    names = list(table)
    best = max(names[ADAPTED_FROM:], key=lambda n: table[n]["accuracy"]["mean"])
    lines = ["| row | accuracy | macro recall | macro F1 | seconds |", "|---|---|---|---|---|"]
    for name in names:
        cells = []
        for metric in METRICS:
            cell = f"{100 * table[name][metric]['mean']:.2f} ± {100 * table[name][metric]['std']:.2f}"
            cells.append(f"**{cell}**" if metric == "accuracy" and name == best else cell)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {table[name]['seconds']['mean']:.0f} |")
    return "\n".join(lines)


def rewrite(text: str, run: dict) -> str:
    task = run["task"]
    if run.get("quick"):
        raise ValueError(f"a `lepton-fast demo --quick` run of {task}: its figures mean nothing, so it writes no table")
    pattern = re.compile(rf"(<!-- demo-table:{task} -->\n)(?:.*?\n)?(<!-- /demo-table:{task} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"README.md has no <!-- demo-table:{task} --> ... <!-- /demo-table:{task} --> block")
    return pattern.sub(lambda m: m[1] + markdown_table(run) + "\n" + m[2], text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by `lepton-fast demo --json`")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if README.md differs")
    args = parser.parse_args(argv)
    before = README.read_text(encoding="utf-8")
    after = before
    for path in args.runs:
        try:
            after = rewrite(after, json.loads(path.read_text(encoding="utf-8")))
        except ValueError as e:
            parser.error(f"{path}: {e}")
    if args.check:
        if after != before:
            print("README.md's demo tables differ from " + ", ".join(map(str, args.runs)), file=sys.stderr)
            return 1
        return 0
    README.write_text(after, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

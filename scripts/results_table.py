"""Print results/README.md's gold table from the committed reports: results/NAME/report.json per run.

usage: python scripts/results_table.py [NAME ...]   (no NAME = every campaign under results/)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent.parent / "results"
DEFAULT = "tinyworld-rs+ppo"


def campaigns() -> list[str]:
    """Every campaign folder under results/ (those with a report.json), the default first."""
    names = sorted(p.parent.name for p in RESULTS.glob("*/report.json"))
    return sorted(names, key=lambda n: n != DEFAULT)


def row(name: str) -> str:
    path = RESULTS / name / "report.json"
    if not path.is_file():
        return f"| `{name}` | (missing: run scripts/regenerate_results.sh {name}) |"
    rounds = json.loads(path.read_text())["rounds"]
    gold = [r["eval"]["gold"]["gold"] for r in rounds]
    last = rounds[-1]["eval"]
    g = last["gold"]
    kl = last.get("kl_to_base")
    kl = kl.get("mean") if isinstance(kl, dict) else kl
    drop = max([0.0] + [gold[i - 1] - gold[i] for i in range(2, len(gold))])
    early = " | ".join(f"{x:.3f}" for x in gold[:-1])
    return (f"| `{name}` | {early} | **{gold[-1]:.3f}** | {g['violation_rate']:.3f} | {g['false_refusal_rate']:.3f} "
            f"({g['false_refusal_rate_borderline']:.3f}) | {'-' if kl is None else f'{kl:.2f}'} | {drop:.3f} |")


def main() -> None:
    names = sys.argv[1:] or campaigns()
    print("| run | V0 | V1 | V2 | V3 | V4 | V5 gold | V5 violation | V5 false refusal (borderline) | V5 KL to base "
          "| worst drop |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        print(row(name))


if __name__ == "__main__":
    main()

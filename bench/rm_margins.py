"""Margin ablation of the TinyWorld reward models (Llama 2 §3.2.2, Table 28), a thin caller of reward.py.

For each margin scheme (none, small, large) trains the helpfulness and the
safety RM on the default TinyWorld's comparisons and evaluates both on both
test sets: ``<out>/margin-<scheme>/`` gets rm_eval.json, rm_eval.md, the score
histograms and train_summary_<kind>.json; ``<out>/summary.json`` and
``<out>/summary.md`` gather the per-level accuracies and the training times.
The checkpoints go to ``--work`` (not kept with the results).

    python bench/rm_margins.py --out results/rm
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from iterative_rlhf.config import load_recipe  # noqa: E402
from iterative_rlhf.console import log  # noqa: E402
from iterative_rlhf.io import atomic_write_json, atomic_write_text  # noqa: E402
from iterative_rlhf.reward import (  # noqa: E402
    KINDS,
    evaluate_reward_models,
    rm_datasets,
    rm_test_sets,
    train_reward_model,
)
from iterative_rlhf.rlmath import LEVELS  # noqa: E402
from iterative_rlhf.tinyworld.build import build_world  # noqa: E402

SCHEMES = ("none", "small", "large")

#: The TinyWorld reward-model settings proposed for recipes/tinyworld.yaml (see results/rm/README.md).
TINYWORLD_RM = [
    f"reward.{kind}.{key}={value}"
    for kind in KINDS
    for key, value in (("learning_rate", 1e-3), ("batch_size", 32), ("per_device_batch_size", 32),
                       ("epochs", 2), ("max_length", 128))
]


def run(out: Path, work: Path, recipe_path: str | None, overrides: list[str], schemes: list[str]) -> dict:
    summary: dict = {"overrides": overrides, "schemes": {}}
    for scheme in schemes:
        recipe = load_recipe(recipe_path, overrides=[*overrides, f"reward.helpful.margin={scheme}",
                                                     f"reward.safety.margin={scheme}"])
        world = build_world(recipe.tinyworld)
        dest = out / f"margin-{scheme}"
        models, times = {}, {}
        for kind in KINDS:
            train, _ = rm_datasets(recipe, kind, world)
            models[kind] = train_reward_model(recipe, kind, work / f"margin-{scheme}" / f"rm_{kind}",
                                              train_ds=train)
            train_summary = json.loads((models[kind] / "train_summary.json").read_text())
            times[kind] = train_summary["train_seconds"]
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy(models[kind] / "train_summary.json", dest / f"train_summary_{kind}.json")
            shutil.copy(models[kind] / "train_log.jsonl", dest / f"train_log_{kind}.jsonl")
        report = evaluate_reward_models(models, rm_test_sets(recipe, world), dest, recipe.scorer.threshold,
                                        world=world)
        summary["schemes"][scheme] = {"accuracy": report["accuracy"], "gate": report.get("gate"),
                                      "tinyworld": report.get("tinyworld"), "train_seconds": times}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", _markdown(summary))
    return summary


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _markdown(summary: dict) -> str:
    lines = ["# TinyWorld reward models: margin ablation", "",
             "Accuracy (%) per preference level, each RM on both test sets (Llama 2 Tables 8 and 28 layout).", "",
             "| margin | RM | test set | significantly better | better | slightly better | negligibly better | avg |",
             "|---|---|---|---|---|---|---|---|"]
    for scheme, s in summary["schemes"].items():
        for r in s["accuracy"]:
            lines.append(f"| {scheme} | {r['model']} | {r['test_set']} | "
                         + " | ".join(_pct(r[lv]) for lv in LEVELS) + f" | {_pct(r['avg'])} |")
    lines += ["", "Gate = sigmoid(safety score) < 0.15 flags an unsafe response (gold judge), on the safety test set's "
              "responses. Rates: safety RM refusal > compliance on harmful prompts; helpful RM correct > wrong and "
              "correct answer > refusal on safe prompts (eval-split prompts, gold judge).", "",
              "| margin | gate precision | gate recall | refusal > compliance | correct > wrong | answer > refusal | "
              "train s (helpful) | train s (safety) |", "|---|---|---|---|---|---|---|---|"]
    for scheme, s in summary["schemes"].items():
        g, t = s["gate"] or {}, s["tinyworld"] or {}
        lines.append(f"| {scheme} | {g.get('precision', 0):.3f} | {g.get('recall', 0):.3f} | "
                     f"{_pct(t.get('refusal_over_compliance', {}).get('rate'))} | "
                     f"{_pct(t.get('correct_over_wrong', {}).get('rate'))} | "
                     f"{_pct(t.get('answer_over_refusal', {}).get('rate'))} | {s['train_seconds']['helpful']:.1f} | "
                     f"{s['train_seconds']['safety']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/rm", help="results folder")
    ap.add_argument("--work", default="", help="checkpoint folder (default: a temporary folder, removed)")
    ap.add_argument("--recipe", default=None, help="recipe YAML (default: the built-in TinyWorld defaults)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="extra key=value recipe overrides (after the TinyWorld RM settings)")
    ap.add_argument("--schemes", default=",".join(SCHEMES), help="margin schemes, comma separated")
    a = ap.parse_args()
    out = Path(a.out)
    schemes = [s for s in a.schemes.split(",") if s]
    if a.work:
        run(out, Path(a.work), a.recipe, [*TINYWORLD_RM, *a.overrides], schemes)
    else:
        with tempfile.TemporaryDirectory(prefix="rm_margins.") as tmp:
            run(out, Path(tmp), a.recipe, [*TINYWORLD_RM, *a.overrides], schemes)
    log(f"margin ablation -> {out / 'summary.md'}")


if __name__ == "__main__":
    main()

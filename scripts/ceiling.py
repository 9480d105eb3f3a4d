"""How high can TinyWorld's eval gold go for a policy fine-tuned on train prompts only?

A campaign never trains on eval prompts: what its policy gets right there it has
either from the base policy (which saw every prompt in the noisy writer's corpus)
or by generalising from the train prompts. This script measures that ceiling
without reward models, rejection sampling or PPO: it fine-tunes the campaign's base
policy (``iterative_rlhf.sft.finetune``, the recipe's SFT settings) on **oracle**
data, one gold-perfect response per train prompt (a correct answer in one of the
writer's correct forms, a refusal on harmful prompts; every row checked by the
gold judge), for several epochs and seeds, and measures gold on the eval prompts
at temperature 1.0 (the reports' temperature) and 0.7.

The same on the train prompts a default campaign fine-tunes on (all but the 1 in 8
that PPO holds out, ``campaign.holdout_from=rs+ppo``) shows what those prompts cost.
As a last reference it fine-tunes on oracle data for every prompt, eval ones
included: what the policy reaches on prompts it was trained on, which is the
limit set by its size and by sampling at temperature 1.0 rather than by
generalisation.

Writes results/ceiling/ceiling.json and results/ceiling/README.md (``--out`` another folder). ``--set`` takes
the recipe settings of ``iterative-rlhf round`` (another world, e.g. ``tinyworld.writer_correct=0.56``).

usage: python scripts/ceiling.py [--epochs 2 4 8 16] [--seeds 0 1 2] [--samples 128] [--set KEY=VALUE ...]
                                 [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "ceiling"


def oracle_rows(prompts: list, seed: int) -> list[dict]:
    """One gold-perfect (prompt, response) row per prompt, the form drawn like the writer's correct answers."""
    from iterative_rlhf.tinyworld.world import judge
    from iterative_rlhf.tinyworld.writer import REFUSALS, _answer

    rng = random.Random(seed)
    rows = []
    for p in prompts:
        response = REFUSALS[1] if p.family == "harmful" else _answer(p, rng, wrong=False)  # "I cannot help ..."
        if judge(p, response).gold != 1:
            raise SystemExit(f"oracle response {response!r} to {p.text!r} is not gold 1 (the judge and the writer "
                             "disagree; fix one of them)")
        rows.append({"prompt": p.text, "response": response, "is_safety": p.family == "harmful"})
    return rows


def run(recipe, trained_on: str, epochs: float, seed: int, samples: int, base: str, work: Path) -> dict:  # noqa: ANN001
    from iterative_rlhf.campaign import is_held_out
    from iterative_rlhf.sft import finetune
    from iterative_rlhf.tinyworld.evaluate import evaluate_policy
    from iterative_rlhf.tinyworld.world import get_prompts

    recipe = dataclasses.replace(recipe)
    recipe.sft = dataclasses.replace(recipe.sft, epochs=epochs)
    if trained_on == "campaign":  # the train prompts less PPO's held-out ones
        prompts = [p for p in get_prompts("train") if not is_held_out(p.text)]
    else:
        prompts = get_prompts(trained_on)
    rows = oracle_rows(prompts, seed)
    out = work / f"{trained_on}-e{epochs:g}-s{seed}"
    t0 = time.perf_counter()
    finetune(recipe, rows, base, out, seed=seed)
    row: dict = {"trained_on": trained_on, "rows": len(rows), "epochs": epochs, "seed": seed}
    for t in (1.0, 0.7):
        m = evaluate_policy(str(out), recipe, split="eval", samples=samples, seed=seed, temperature=t)
        row[f"t{t:g}"] = {k: m[k] for k in ("gold", "helpful_rate", "violation_rate", "false_refusal_rate",
                                             "false_refusal_rate_borderline")}
    m = evaluate_policy(str(out), recipe, split="train", samples=16, seed=seed)
    row["train_gold_t1"] = m["gold"]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| fine-tuned on | epochs | seeds | eval gold, T=1.0 | violation, T=1.0 | borderline false refusal, "
             "T=1.0 | eval gold, T=0.7 | violation, T=0.7 | train gold, T=1.0 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["trained_on"], r["epochs"]), []).append(r)

    def cell(rs: list[dict], get) -> str:  # noqa: ANN001
        v = [get(r) for r in rs]
        return f"{statistics.mean(v):.3f}" + (f" ± {statistics.stdev(v):.3f}" if len(v) > 1 else "")

    for (on, ep), rs in groups.items():
        label = {"train": "train prompts", "campaign": "train prompts less PPO's held-out ones",
                 "all": "every prompt (eval too)"}[on]
        lines.append(f"| {label} | {ep:g} | {len(rs)} | {cell(rs, lambda r: r['t1']['gold'])} "
                     f"| {cell(rs, lambda r: r['t1']['violation_rate'])} "
                     f"| {cell(rs, lambda r: r['t1']['false_refusal_rate_borderline'])} "
                     f"| {cell(rs, lambda r: r['t0.7']['gold'])} | {cell(rs, lambda r: r['t0.7']['violation_rate'])} "
                     f"| {cell(rs, lambda r: r['train_gold_t1'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, nargs="+", default=[2.0, 4.0, 8.0, 16.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=128, help="samples per eval prompt")
    ap.add_argument("--campaign-epochs", type=float, nargs="+", default=[4.0, 8.0],
                    help="epochs on the prompts a campaign fine-tunes on (train less PPO's held-out ones)")
    ap.add_argument("--all-epochs", type=float, default=4.0,
                    help="epochs of the reference fine-tuned on every prompt (eval ones too)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a recipe setting, as in `iterative-rlhf round --set` (e.g. another world's tinyworld.*)")
    ap.add_argument("--out", type=Path, default=OUT, help="folder of ceiling.json and README.md")
    args = ap.parse_args()

    from iterative_rlhf.config import load_recipe
    from iterative_rlhf.tinyworld.build import build_world

    recipe = load_recipe(None, args.overrides)
    base = str(build_world(recipe.tinyworld).policy)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plan = [("train", e, s) for e in args.epochs for s in args.seeds]
        plan += [("campaign", e, s) for e in args.campaign_epochs for s in args.seeds]
        plan += [("all", args.all_epochs, s) for s in args.seeds]
        for on, ep, s in plan:
            rows.append(run(recipe, on, ep, s, args.samples, base, Path(tmp)))
            r = rows[-1]
            print(f"{on} epochs {ep:g} seed {s}: eval gold {r['t1']['gold']:.3f} violation "
                  f"{r['t1']['violation_rate']:.4f} (T=0.7: {r['t0.7']['gold']:.3f}), train gold "
                  f"{r['train_gold_t1']:.3f}, {r['seconds']} s", flush=True)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceiling.json").write_text(json.dumps(rows, indent=2) + "\n")
    cmd = "python scripts/ceiling.py" + ("" if len(sys.argv) == 1 else " " + " ".join(sys.argv[1:]))
    world = f" The world: {', '.join(args.overrides)}." if args.overrides else ""
    (out / "README.md").write_text(
        "# Eval gold of a policy fine-tuned on oracle data (train prompts only)\n\n"
        f"Made by:\n\n```bash\n{cmd}\n```\n\n"
        "The TinyWorld base policy fine-tuned with the default recipe's SFT settings on one gold-perfect "
        "response per prompt (the writer's correct forms; a refusal on harmful prompts), then sampled "
        f"{args.samples} times per eval prompt. No reward model, rejection sampling or PPO is involved: this is "
        "what fine-tuning on perfect data for the train prompts gives on the eval prompts, the most a campaign's "
        "fine-tuning can pass on. The rows 'less PPO's held-out ones' train on the 236 prompts a default campaign "
        "fine-tunes on (of 265). The last rows fine-tune on every prompt, eval ones included (the limit "
        "of the policy's size at that temperature, not of generalisation). Mean ± sd over the seeds (data "
        "forms, SFT order and sampling)." + world + "\n\n" + table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()

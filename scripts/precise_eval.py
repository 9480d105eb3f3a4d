"""Re-measure each committed campaign's last policy on the eval prompts with many samples per prompt.

A campaign report samples 16 responses per eval prompt: 80 responses to the 5
harmful eval prompts, so one violation moves the violation rate by 0.0125.
This script samples 128 per prompt (640 harmful responses) from the last
round's checkpoint of runs/NAME (the run directory that made results/NAME),
writes results/precise-eval/NAME.json and results/precise-eval/README.md (every campaign: with NAMEs,
the others from their earlier NAME.json), and
prints the table, with the mean and standard deviation over the seeds of each group in SEEDS
(the default, the previous default, ...).

With --temperature T other than 1.0 (the reports' sampling temperature) it measures the same
checkpoints as deployed with a lower temperature, into results/precise-eval/tT/ (its own README).

With --rounds it also measures every round's policy of each NAME (V1..Vn) the same way, into
rounds/NAME.json beside the others, and the README gets a table of gold per round with each campaign's
largest fall from one round to the next.

usage: python scripts/precise_eval.py [--samples 128] [--seed 0] [--temperature 1.0] [--rounds] [--table-only]
                                      [NAME ...]   (no NAME = every campaign)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
OUT = RESULTS / "precise-eval"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_table import campaigns  # noqa: E402

DEFAULT = ("tinyworld-rs+ppo", "default-seed1", "default-seed2")
HELD_OUT_IN_RS = tuple(f"ablation-sft-init-previous-e2-safety-weight3-holdout-ppo{s}" for s in ("", "-seed1", "-seed2"))
SEEDS = {"default": DEFAULT,
         "pool previous (the previous default)": ("ablation-pool-previous", "ablation-pool-previous-seed1",
                                                  "ablation-pool-previous-seed2"),
         "sft safety weight 3": ("ablation-sft-safety-weight3", "ablation-sft-safety-weight3-seed1",
                                 "ablation-sft-safety-weight3-seed2"),
         "sft from the previous round, 2 epochs": ("ablation-sft-init-previous-e2",
                                                   "ablation-sft-init-previous-e2-seed1",
                                                   "ablation-sft-init-previous-e2-seed2"),
         "sft from the previous round, 2 epochs, safety weight 3": (
             "ablation-sft-init-previous-e2-safety-weight3", "ablation-sft-init-previous-e2-safety-weight3-seed1",
             "ablation-sft-init-previous-e2-safety-weight3-seed2"),
         "the same, PPO's held-out prompts in RS": HELD_OUT_IN_RS,
         "default (seeds 3 and 4 added)": (*DEFAULT, "default-seed3", "default-seed4"),
         "default, eight seeds (5-7 added)": (*DEFAULT, *(f"default-seed{k}" for k in range(3, 8))),
         "no merging of rounds": (  # the default before this version (campaign.merge=1), seeds 0-4
             "ablation-merge-off", *(f"ablation-merge-off-seed{k}" for k in (1, 2, 3, 4))),
         "helpfulness RM one pass of 32 pairs": (  # the default before that, seeds 0-4
             "ablation-rm-per-device32", *(f"ablation-rm-per-device32-seed{k}" for k in (1, 2, 3, 4))),
         "the same, PPO's held-out prompts in RS (seeds 3 and 4 added)": (
             *HELD_OUT_IN_RS, *(f"{HELD_OUT_IN_RS[0]}-seed{k}" for k in (3, 4))),
         "select best (campaign.select=best)": ("ablation-select-best",
                                                 *(f"ablation-select-best-seed{k}" for k in (1, 2, 3, 4))),
         "temperature search (rs.temperature_search=[0.7,1.0,1.3])": ("ablation-rs-temperature-search",
                                                                       "ablation-rs-temperature-search-seed4"),
         "no refresh before PPO": ("ablation-no-refresh-before-ppo", "ablation-no-refresh-before-ppo-seed1",
                                   "ablation-no-refresh-before-ppo-seed2"),
         "RM batches of 4 prompts' pairs, each response scored once": ("ablation-rm-prompts-per-batch4",
                                                                      "ablation-rm-prompts-per-batch4-seed1"),
         "RM batches of 8 prompts' pairs, 64 pairs per step": ("ablation-rm-prompts-per-batch8-b64",
                                                              "ablation-rm-prompts-per-batch8-b64-seed1"),
         "RM training under bf16 autocast": ("ablation-rm-bf16", "ablation-rm-bf16-seed1"),
         "no group by length": ("ablation-no-group-by-length", "ablation-no-group-by-length-seed1",
                                "ablation-no-group-by-length-seed2"),
         "previous-default (P)": ("previous-default", "previous-default-seed1", "previous-default-seed2"),
         "writer: 0.50 correct, 0.50 harmful complied": ("ablation-writer-correct0.50-comply0.50",
                                                         "ablation-writer-correct0.50-comply0.50-seed1"),
         "writer: 0.56 correct, 0.45 harmful complied": tuple(f"ablation-writer-correct0.56-comply0.45{s}"
                                                               for s in ("", "-seed1", "-seed2", "-seed3")),
         "the same writer, SFT from the previous round, 2 epochs, safety weight 3": (
             "ablation-writer-correct0.56-comply0.45-sft-init-previous-e2-safety-weight3",
             "ablation-writer-correct0.56-comply0.45-sft-init-previous-e2-safety-weight3-seed1"),
         "the same writer, SFT from the previous round, 2 epochs, safety weight 3, PPO's held-out prompts in RS": tuple(
             f"ablation-writer-correct0.56-comply0.45-sft-init-previous-e2-safety-weight3-holdout-ppo{s}"
             for s in ("", "-seed1", "-seed2", "-seed3"))}
KEYS = ("gold", "helpful_rate", "violation_rate", "false_refusal_rate", "false_refusal_rate_borderline")


def last_policy(name: str) -> Path:
    report = json.loads((RESULTS / name / "report.json").read_text())
    policy = ROOT / "runs" / name / report["rounds"][-1]["policy"]
    if not (policy / "config.json").is_file():
        raise SystemExit(f"{policy}: no checkpoint; run scripts/regenerate_results.sh {name} first")
    return policy


def out_dir(temperature: float) -> Path:
    """results/precise-eval for the reports' temperature 1.0, results/precise-eval/tT for another."""
    return OUT if temperature == 1.0 else OUT / f"t{temperature:g}"


def measure(name: str, samples: int, seed: int, temperature: float = 1.0) -> dict:
    from iterative_rlhf.config import load_recipe
    from iterative_rlhf.tinyworld.evaluate import evaluate_policy

    recipe = load_recipe(str(RESULTS / name / "config.yaml"))
    policy = last_policy(name)
    m = evaluate_policy(str(policy), recipe, split="eval", samples=samples, seed=seed, temperature=temperature)
    row = {"name": name, "policy": str(policy.relative_to(ROOT)), "samples_per_prompt": samples, "seed": seed, **m}
    if temperature != 1.0:
        row["temperature"] = temperature
    out = out_dir(temperature)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def measure_rounds(name: str, samples: int, seed: int, temperature: float, last: dict) -> dict:
    """Every round's policy of runs/NAME (V1..Vn), like :func:`measure` (whose row ``last`` is the last
    round's: not sampled again); writes rounds/NAME.json."""
    from iterative_rlhf.config import load_recipe
    from iterative_rlhf.tinyworld.evaluate import evaluate_policy

    recipe = load_recipe(str(RESULTS / name / "config.yaml"))
    report = json.loads((RESULTS / name / "report.json").read_text())
    rounds = []
    for r in report["rounds"][1:]:
        policy = ROOT / "runs" / name / r["policy"]
        if not (policy / "config.json").is_file():
            raise SystemExit(f"{policy}: no checkpoint; run scripts/regenerate_results.sh {name} first")
        if str(policy.relative_to(ROOT)) == last["policy"]:
            m = last
        else:
            m = evaluate_policy(str(policy), recipe, split="eval", samples=samples, seed=seed,
                                temperature=temperature)
        rounds.append({"round": r["name"], "policy": str(policy.relative_to(ROOT)), **{k: m[k] for k in KEYS}})
        print(f"{name} {r['name']}: gold {m['gold']:.3f} violation {m['violation_rate']:.4f}", flush=True)
    row = {"name": name, "samples_per_prompt": samples, "seed": seed, "temperature": temperature, "rounds": rounds}
    out = out_dir(temperature) / "rounds"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(row, indent=2) + "\n")
    return row


def rounds_table(out: Path) -> str:
    """Gold per round of every rounds/NAME.json, and each campaign's largest fall between two rounds."""
    files = sorted((out / "rounds").glob("*.json")) if (out / "rounds").is_dir() else []
    rows = [json.loads(f.read_text()) for f in files]
    if not rows:
        return ""
    n = max(len(r["rounds"]) for r in rows)
    lines = ["| run | " + " | ".join(f"V{k}" for k in range(1, n + 1)) + " | largest fall | last round's violation |",
             "| --- |" + " --- |" * (n + 2)]
    for r in rows:
        gold = [x["gold"] for x in r["rounds"]]
        fall = max([0.0] + [a - b for a, b in zip(gold, gold[1:])])
        lines.append(f"| `{r['name']}` | " + " | ".join(f"{g:.3f}" for g in gold) + " |" * (n - len(gold))
                     + f" | {fall:.3f} | {r['rounds'][-1]['violation_rate']:.4f} |")
    return ("\n\n## Every round\n\nGold of each round's policy, the same samples per prompt and temperature "
            "(`--rounds`); largest fall = the most gold lost from one round to the next.\n\n" + "\n".join(lines))


def seed_list(names: tuple[str, ...]) -> str:
    """'0-2' for seeds 0, 1, 2 (a name without -seedN is seed 0); '0, 4' when they are not consecutive."""
    seeds = sorted(int(n.rsplit("-seed", 1)[1]) if "-seed" in n else 0 for n in names)
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def table(rows: list[dict]) -> str:
    lines = [f"| run | gold | helpful rate | violation ({rows[0]['n_harmful']} harmful) | false refusal "
             "| borderline false refusal |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| `{r['name']}` | {r['gold']:.3f} | {r['helpful_rate']:.3f} | {r['violation_rate']:.4f} "
              f"| {r['false_refusal_rate']:.4f} | {r['false_refusal_rate_borderline']:.4f} |" for r in rows]
    for label, names in SEEDS.items():
        seeds = [r for r in rows if r["name"] in names]
        if len(seeds) == len(names):
            cells = [f"{statistics.mean(r[k] for r in seeds):.3f} ± {statistics.stdev(r[k] for r in seeds):.3f}"
                     for k in KEYS]
            lines.append(f"| {label}, seeds {seed_list(names)} (mean ± sd) | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128, help="samples per eval prompt (the reports use 16)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="sampling temperature (the reports: 1.0; another writes to results/precise-eval/tT/)")
    ap.add_argument("--table-only", action="store_true",
                    help="measure nothing: rebuild the README from the JSONs already there")
    ap.add_argument("--rounds", action="store_true", help="also measure every round's policy of each NAME")
    ap.add_argument("names", nargs="*", help="campaigns under results/ (default: all)")
    args = ap.parse_args()
    names = [] if args.table_only else args.names or campaigns()
    rows = []
    for name in names:
        rows.append(measure(name, args.samples, args.seed, args.temperature))
        print(f"{name}: gold {rows[-1]['gold']:.3f} violation {rows[-1]['violation_rate']:.4f}", flush=True)
        if args.rounds:
            measure_rounds(name, args.samples, args.seed, args.temperature, rows[-1])
    # The README covers every campaign: with NAMEs, the others come from their earlier JSON (same samples/seed).
    measured = {r["name"]: r for r in rows}
    out = out_dir(args.temperature)
    earlier = {n: json.loads((out / f"{n}.json").read_text()) for n in campaigns()
               if n not in measured and (out / f"{n}.json").is_file()}
    complete = all(n in measured or (n in earlier and earlier[n]["samples_per_prompt"] == args.samples
                                     and earlier[n]["seed"] == args.seed
                                     and earlier[n].get("temperature", 1.0) == args.temperature)
                   for n in campaigns())
    t = args.temperature
    if complete or (t != 1.0 and (measured or earlier)):  # at another temperature: the campaigns measured there
        rows = [measured.get(n) or earlier[n] for n in campaigns() if n in measured or n in earlier]
        text = (f"# Last-round policies, {args.samples} samples per eval prompt"
                f"{'' if t == 1.0 else f', temperature {t:g}'}\n\n"
                "Made by:\n\n```bash\npython scripts/precise_eval.py"
                f"{'' if t == 1.0 else f' --temperature {t:g}'}"
                f"{'' if complete else ' ' + ' '.join(r['name'] for r in rows)}\n```\n\n"
                f"{'' if complete else 'Only the campaigns below were measured at this temperature (NAME ... '}"
                f"{'' if complete else 'names them). '}"
                f"Each campaign's last checkpoint (runs/NAME) sampled {args.samples} times per eval prompt at "
                f"temperature {t:g} (the reports: 16, at 1.0 and at campaign.deploy_temperature), scored by "
                "TinyWorld's gold judge.\n\n"
                f"{table(rows)}{rounds_table(out)}\n")
        (out / "README.md").write_text(text)
    print(table(rows))


if __name__ == "__main__":
    main()

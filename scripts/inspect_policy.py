"""Where a campaign's last policy loses gold and how it answers harmful prompts, at many samples per prompt.

For runs/NAME (the run directory behind results/NAME) it samples the last round's
checkpoint (``--checkpoint ppo``, the round's policy, or ``rs``, its RS checkpoint
before PPO) ``--samples`` times per prompt at temperature 1.0 and writes
results/inspect/NAME[-rs].md and .json with:

- the eval prompts of lowest gold, each with its three most frequent responses;
- on the harmful prompts of each split: the violation rate, the policy's probability
  of each first response token (mean over the prompts), and how many violations are
  the noisy writer's compliance templates (``tinyworld.writer.COMPLY``, whole or cut
  short) rather than other text.

usage: python scripts/inspect_policy.py NAME [NAME ...] [--checkpoint ppo|rs] [--samples 128] [--worst 12]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "results" / "inspect"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from precise_eval import last_policy  # noqa: E402


def checkpoint(name: str, which: str) -> Path:
    """The last round's policy (``ppo``) or the RS checkpoint it started from (``rs``)."""
    policy = last_policy(name)
    if which == "ppo":
        return policy
    rs = policy.parent.parent / "rs_policy"  # runs/NAME/vK/ppo/policy -> runs/NAME/vK/rs_policy
    if not (rs / "config.json").is_file():
        raise SystemExit(f"{rs}: no RS checkpoint (a campaign in mode ppo has none)")
    return rs


def is_template(response: str) -> bool:
    """A response that starts like one of the writer's compliance templates (the part before the act)."""
    from iterative_rlhf.tinyworld.writer import COMPLY

    return any(response.startswith(t.split("{act}")[0]) for t in COMPLY)


def first_tokens(policy: Path, prompts: list, top: int = 4) -> dict[str, float]:
    """Mean probability over ``prompts`` of the policy's first response token (its ``top`` likeliest per prompt)."""
    import torch

    from iterative_rlhf.checkpoint import load_causal_lm, load_tokenizer
    from iterative_rlhf.generation import chat_prompts

    tok = load_tokenizer(str(policy))
    model = load_causal_lm(str(policy), dtype="float32").eval()
    total: collections.Counter = collections.Counter()
    for text in chat_prompts(tok, [p.text for p in prompts]):
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            probs = model(ids).logits[0, -1].softmax(-1)
        values, indices = probs.topk(top)
        for v, i in zip(values.tolist(), indices.tolist(), strict=True):
            total[tok.convert_ids_to_tokens(i)] += v / len(prompts)
    return dict(total.most_common(top))


def inspect(name: str, which: str, samples: int, worst: int) -> dict:
    from iterative_rlhf.config import load_recipe
    from iterative_rlhf.generation import make_engine
    from iterative_rlhf.tinyworld.evaluate import sample_world
    from iterative_rlhf.tinyworld.world import get_prompts, is_refusal, metrics

    recipe = load_recipe(str(ROOT / "results" / name / "config.yaml"))
    policy = checkpoint(name, which)
    engine = make_engine(str(policy), recipe.generation, seed=0)
    try:
        pairs = {split: sample_world(engine, get_prompts(split), samples, 1.0, recipe.generation.max_new_tokens, 0)
                 for split in ("eval", "train")}
    finally:
        engine.close()
    by_prompt: dict[str, list] = collections.defaultdict(list)
    for p, r in pairs["eval"]:
        by_prompt[p.text].append((p, r))
    lowest = sorted((metrics(rows)["gold"], text, collections.Counter(r for _, r in rows).most_common(3))
                    for text, rows in by_prompt.items())[:worst]
    harmful = {}
    for split, rows in pairs.items():
        rows = [(p, r) for p, r in rows if p.family == "harmful"]
        violations = [r for _, r in rows if not is_refusal(r)]
        harmful[split] = {
            "prompts": len({p.text for p, _ in rows}), "samples": len(rows),
            "violation_rate": len(violations) / len(rows), "violations": len(violations),
            "template_violations": sum(is_template(r) for r in violations),
            "first_token": first_tokens(policy, sorted({p for p, _ in rows}, key=lambda p: p.text)),
            "most_frequent_violations": collections.Counter(violations).most_common(8),
        }
    return {"name": name, "checkpoint": str(policy.relative_to(ROOT)), "samples_per_prompt": samples,
            "eval_gold": metrics(pairs["eval"])["gold"],
            "lowest_gold": [{"prompt": t, "gold": g, "responses": c} for g, t, c in lowest], "harmful": harmful}


def markdown(rep: dict, command: str) -> str:
    lines = [f"# {rep['name']}: {rep['checkpoint']}", "", "Made by:", "", "```bash", command, "```", "",
             f"{rep['samples_per_prompt']} samples per prompt at temperature 1.0; eval gold {rep['eval_gold']:.3f}.",
             "", "## Eval prompts of lowest gold", "", "| gold | prompt | most frequent responses (count) |",
             "| --- | --- | --- |"]
    for row in rep["lowest_gold"]:
        said = "; ".join(f"{r!r} ({c})" for r, c in row["responses"]).replace("|", "\\|")
        lines.append(f"| {row['gold']:.3f} | {row['prompt']} | {said} |")
    lines += ["", "## Harmful prompts", "", "| split | prompts | violation rate | violations that are the writer's "
              "compliance templates | first response token (mean probability) |", "| --- | --- | --- | --- | --- |"]
    for split, h in rep["harmful"].items():
        first = ", ".join(f"{t!r} {p:.3f}" for t, p in h["first_token"].items())
        lines.append(f"| {split} | {h['prompts']} | {h['violation_rate']:.4f} ({h['violations']} of {h['samples']}) "
                     f"| {h['template_violations']} of {h['violations']} | {first} |")
    for split, h in rep["harmful"].items():
        lines += ["", f"Most frequent violations ({split}):", ""]
        lines += [f"- {r!r} ({c})" for r, c in h["most_frequent_violations"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="+", help="campaigns under results/")
    ap.add_argument("--checkpoint", choices=("ppo", "rs"), default="ppo",
                    help="the last round's policy (ppo) or its RS checkpoint before PPO (rs)")
    ap.add_argument("--samples", type=int, default=128, help="samples per prompt")
    ap.add_argument("--worst", type=int, default=12, help="eval prompts of lowest gold to list")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        rep = inspect(name, args.checkpoint, args.samples, args.worst)
        stem = name if args.checkpoint == "ppo" else f"{name}-rs"
        command = f"python scripts/inspect_policy.py {name}" + \
            ("" if args.checkpoint == "ppo" else " --checkpoint rs") + \
            ("" if args.samples == 128 else f" --samples {args.samples}") + \
            ("" if args.worst == 12 else f" --worst {args.worst}")
        (OUT / f"{stem}.json").write_text(json.dumps(rep, indent=2) + "\n")
        (OUT / f"{stem}.md").write_text(markdown(rep, command))
        h = rep["harmful"]
        print(f"{stem}: eval gold {rep['eval_gold']:.3f}; violations eval {h['eval']['violation_rate']:.4f}, "
              f"train {h['train']['violation_rate']:.4f}", flush=True)


if __name__ == "__main__":
    main()

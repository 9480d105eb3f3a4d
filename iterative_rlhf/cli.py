"""``iterative-rlhf``: the command line. It parses, builds, runs, saves; the logic lives in the stage modules.

Every command takes ``--recipe FILE`` (default: the built-in TinyWorld recipe)
and ``--set key=value`` overrides. Errors the user can fix are printed as one
line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import AwaitingAnnotations, UserError


def _recipe(args: argparse.Namespace):  # noqa: ANN202
    from .config import load_recipe

    # No recipe: the config defaults, which are the TinyWorld recipe (recipes/tinyworld.yaml spells them out).
    return load_recipe(args.recipe, args.set or [])


def _positive(name: str) -> Callable[[str], int]:
    def parse(v: str) -> int:
        try:
            i = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {v!r}") from None
        if i < 1:
            raise argparse.ArgumentTypeError(f"{name} must be at least 1, got {i}")
        return i
    return parse


def _positive_float(name: str) -> Callable[[str], float]:
    def parse(v: str) -> float:
        try:
            x = float(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {v!r}") from None
        if not x > 0 or x == float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number above 0, got {v}")
        return x
    return parse


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", type=Path, default=None,
                   help="YAML recipe (default: the built-in TinyWorld recipe, recipes/tinyworld.yaml).")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="Override a recipe field, e.g. --set rs.n=16 (repeatable).")


# --------------------------------------------------------------------------- commands


def cmd_config(args: argparse.Namespace) -> None:
    from .config import field_help
    from .console import console, table

    if args.fields:
        table("recipe fields", ["key", "default", "help"], field_help())
        return
    console.print(_recipe(args).to_yaml(), highlight=False, markup=False)


def cmd_tinyworld_build(args: argparse.Namespace) -> None:
    from .console import log
    from .tinyworld.build import build_world

    recipe = _recipe(args)
    paths = build_world(recipe.tinyworld, force=args.force)
    log(f"TinyWorld ready: {paths.root}")
    log(f"  policy:      {paths.policy}")
    log(f"  prompts:     {paths.prompts('train')}, {paths.prompts('eval')}")
    for kind in ("helpful", "safety"):
        log(f"  comparisons: {paths.comparisons(kind, 'train')}, {paths.comparisons(kind, 'test')}")


def cmd_tinyworld_eval(args: argparse.Namespace) -> None:
    from .console import table
    from .io import atomic_write_json
    from .tinyworld.evaluate import evaluate_policy

    recipe = _recipe(args)
    model = args.model
    if model is None:
        from .tinyworld.build import build_world

        model = str(build_world(recipe.tinyworld).policy)
    m = evaluate_policy(model, recipe, split=args.split, samples=args.samples, seed=args.seed,
                        temperature=args.temperature)
    table(f"TinyWorld gold metrics ({args.split} split, {args.samples} samples per prompt, "
          f"temperature {args.temperature})",
          ["metric", "value"], list(m.items()))
    if args.out:
        atomic_write_json(args.out, m)


def cmd_sample(args: argparse.Namespace) -> None:
    from .sampling import sample_file

    recipe = _recipe(args)
    if args.engine:
        recipe.generation.engine = args.engine
    if args.max_new_tokens:
        recipe.generation.max_new_tokens = args.max_new_tokens
    sample_file(recipe, model=args.model, prompts_path=args.prompts, out_path=args.out, n=args.n,
                temperature=args.temperature, seed=args.seed)


def _campaign_recipe(args: argparse.Namespace):  # noqa: ANN202
    recipe = _recipe(args)
    if getattr(args, "mode", None):
        recipe.campaign.mode = args.mode
    return recipe


def cmd_round(args: argparse.Namespace) -> None:
    from .campaign import run_campaign

    recipe = _campaign_recipe(args)
    run_campaign(recipe, args.out, rounds=args.n, force=args.force)


def _one_round(args: argparse.Namespace, what: str) -> None:
    from .campaign import Campaign

    recipe = _campaign_recipe(args)
    if args.round > recipe.campaign.rounds:
        recipe.campaign.rounds = args.round
    c = Campaign(recipe, args.out, force=args.force)
    c.prepare()
    c.train_rms()
    k = args.round
    if k > 1 and not c.manifest.done(f"v{k - 1}/report"):
        raise UserError(f"{args.out}: round v{k - 1} has not finished; run `iterative-rlhf round --n {k - 1} "
                        f"--out {args.out}` first (or --round 1)")
    if what == "rs":
        if not c.runs_rs(k):
            raise UserError(f"campaign.mode={recipe.campaign.mode} has no rejection sampling")
        c.run_rs(k, c.policy_of(k - 1))
    else:
        d = c.dir / f"v{k}"
        start = str(d / "rs_policy") if (d / "rs_policy").exists() else c.policy_of(k - 1)
        c.stage(f"v{k}/ppo", [d / "ppo" / "policy", d / "ppo.json"], lambda: c.ppo(k, start))


def cmd_rs(args: argparse.Namespace) -> None:
    _one_round(args, "rs")


def cmd_ppo(args: argparse.Namespace) -> None:
    _one_round(args, "ppo")


def cmd_sft(args: argparse.Namespace) -> None:
    from .io import read_jsonl
    from .sft import finetune

    recipe = _recipe(args)
    init = args.init or _base_policy(recipe)
    finetune(recipe, read_jsonl(args.data, required=("prompt", "response")), init, args.out,
             recipe.seed if args.seed is None else args.seed)


def _base_policy(recipe) -> str:  # noqa: ANN001
    world = _world_if_used(recipe)
    return str(world.policy) if world is not None else recipe.model.policy


def cmd_rm_train(args: argparse.Namespace) -> None:
    from .reward import rm_datasets, train_reward_model

    recipe = _recipe(args)
    world = _world_if_used(recipe)
    init = args.init or (str(world.policy) if world is not None and recipe.reward.helpful.init == "policy"
                         else None)
    train_ds, _ = rm_datasets(recipe, args.kind, world)
    train_reward_model(recipe, args.kind, args.out, init_path=init, train_ds=train_ds)


def cmd_rm_eval(args: argparse.Namespace) -> None:
    from .reward import evaluate_reward_models, rm_test_sets

    recipe = _recipe(args)
    world = _world_if_used(recipe)
    evaluate_reward_models({"helpful": args.helpful, "safety": args.safety}, rm_test_sets(recipe, world),
                           args.out, threshold=recipe.scorer.threshold, world=world)


def cmd_prompts(args: argparse.Namespace) -> None:
    from .reward import campaign_prompt_files

    recipe = _recipe(args)
    train_out = args.train_out or recipe.campaign.prompts
    eval_out = args.eval_out or recipe.campaign.eval_prompts
    if not train_out or not eval_out:
        raise UserError("campaign.prompts / campaign.eval_prompts: the recipe names no prompt files; set them "
                        "(--set campaign.prompts=F) or pass --train-out and --eval-out")
    campaign_prompt_files(recipe, train_out, eval_out, max_train=args.max_train, max_eval=args.max_eval,
                          force=args.force)


def cmd_annotate(args: argparse.Namespace) -> None:
    from .annotate import annotate

    annotate(args.pairs, args.out, args.kind, safety_only=args.safety_only)


def _world_if_used(recipe):  # noqa: ANN001, ANN202
    if recipe.model.policy != "tinyworld":
        return None
    from .tinyworld.build import build_world

    return build_world(recipe.tinyworld)


def cmd_score(args: argparse.Namespace) -> None:
    from .scorer import score_file

    recipe = _recipe(args)
    score_file(recipe, args.input, args.out, args.helpful, args.safety)


def cmd_report(args: argparse.Namespace) -> None:
    from .report import print_summary, write_report

    print_summary(write_report(args.dir))


def cmd_compare(args: argparse.Namespace) -> None:
    from .report import compare_runs

    compare_runs(args.dirs, args.out)


# --------------------------------------------------------------------------- parser


ENVIRONMENT = """environment:
  ITERATIVE_RLHF_CACHE        where TinyWorld is built and cached (default ~/.cache/iterative-rlhf)
  ITERATIVE_RLHF_THREADS      torch threads of small models on a CPU (default: 1; 2 for RM training
                              in one pass per step)
  ITERATIVE_RLHF_AT_ONCE      1: train the two RMs at once, a process each, and pre-train TinyWorld's
                              policy, and an RM with micro-batches, with a helper process; 0: one process;
                              unset: 1 on a CPU machine with 2+ cores when the work is big enough (the
                              same weights either way)
  ITERATIVE_RLHF_NO_PROGRESS  1: no progress bars (log lines only)"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="iterative-rlhf",
        description="Llama-2-style iterative RLHF: helpfulness and safety reward models, a gated scorer,\n"
                    "best-of-N rejection sampling, PPO, and V1..Vn campaigns. Runs on the built-in\n"
                    "TinyWorld by default.",
        epilog=ENVIRONMENT, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="Print the resolved recipe (or every field with its help).")
    _add_recipe_args(p)
    p.add_argument("--fields", action="store_true", help="List every recipe field with default and help.")
    p.set_defaults(func=cmd_config)

    tw = sub.add_parser("tinyworld", help="The built-in TinyWorld: build it, evaluate a policy on it.")
    tws = tw.add_subparsers(dest="tw_command", required=True, metavar="ACTION")
    p = tws.add_parser("build", help="Build the base policy, prompts and comparisons (cached).")
    _add_recipe_args(p)
    p.add_argument("--force", action="store_true", help="Rebuild even if cached.")
    p.set_defaults(func=cmd_tinyworld_build)
    p = tws.add_parser("eval", help="Gold metrics of a policy on TinyWorld prompts.")
    _add_recipe_args(p)
    p.add_argument("--model", default=None, help="Policy checkpoint (default: the TinyWorld base policy).")
    p.add_argument("--split", choices=["train", "eval", "all"], default="eval", help="Prompt split.")
    p.add_argument("--samples", type=_positive("--samples"), default=4, help="Samples per prompt.")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    p.add_argument("--temperature", type=_positive_float("--temperature"), default=1.0,
                   help="Sampling temperature (the campaign reports sample at 1.0 and at campaign.deploy_temperature, "
                   "0.6 by default, the one written into each round's checkpoint; 0.1 is close to greedy).")
    p.add_argument("--out", type=Path, default=None, help="Also write the metrics as JSON here.")
    p.set_defaults(func=cmd_tinyworld_eval)

    p = sub.add_parser("sample", help="Sample K responses per prompt from any checkpoint.")
    _add_recipe_args(p)
    p.add_argument("--model", required=True, help="Checkpoint folder or hub name.")
    p.add_argument("--prompts", type=Path, required=True, help="JSONL with a 'prompt' column (and 'is_safety').")
    p.add_argument("--n", type=_positive("--n"), default=1, help="Samples per prompt.")
    p.add_argument("--out", type=Path, required=True, help="Output JSONL (prompt, response, sample, ...).")
    p.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature.")
    p.add_argument("--max-new-tokens", type=_positive("--max-new-tokens"), default=None,
                   help="Response length limit (default: generation.max_new_tokens).")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed.")
    p.add_argument("--engine", choices=["hf", "vllm"], default=None, help="Override generation.engine.")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("prompts", help="Write a campaign's prompt files from its reward models' comparisons.",
                       description="Eval prompts: the prompts of both RMs' test comparisons (reward.*.test_data, "
                       "or the 5%% of prompts held out of reward.*.data); train prompts: those of their training "
                       "comparisons less the eval ones. A prompt of a safety comparison is safety-tagged "
                       "(is_safety, which the gate reads). Writes the recipe's campaign.prompts and "
                       "campaign.eval_prompts.")
    _add_recipe_args(p)
    p.add_argument("--train-out", type=Path, default=None, help="Train prompts JSONL (default: campaign.prompts).")
    p.add_argument("--eval-out", type=Path, default=None,
                   help="Eval prompts JSONL (default: campaign.eval_prompts).")
    p.add_argument("--max-train", type=_positive("--max-train"), default=None,
                   help="Keep at most this many train prompts (chosen by hash; default: all).")
    p.add_argument("--max-eval", type=_positive("--max-eval"), default=None,
                   help="Keep at most this many eval prompts (chosen by hash; default: all).")
    p.add_argument("--force", action="store_true", help="Overwrite existing prompt files.")
    p.set_defaults(func=cmd_prompts)

    p = sub.add_parser("annotate", help="Compare a round's pairs in the terminal (people's comparisons for an RM "
                       "refresh).", description="Shows each pair of a campaign's vK/rm/pairs.jsonl as responses A "
                       "and B, asks which is more helpful (or safer) and by how much on Llama 2's four levels, and "
                       "writes canonical comparisons: the file reward.refresh_data names. Every answer is saved; "
                       "rerun to go on where you stopped.")
    p.add_argument("pairs", type=Path, help="A round's pairs.jsonl (prompt, response_0, response_1, is_safety).")
    p.add_argument("--kind", choices=["helpful", "safety"], required=True, help="Which RM the comparisons feed.")
    p.add_argument("--out", type=Path, required=True, help="Comparisons JSONL (appended to when it exists).")
    p.add_argument("--safety-only", action="store_true", help="Only the pairs of safety-tagged prompts.")
    p.set_defaults(func=cmd_annotate)

    p = sub.add_parser("round", help="Run a campaign of rounds V1..Vn (the main job); resumable.")
    _add_recipe_args(p)
    p.add_argument("--n", type=_positive("--n"), default=None, help="Rounds (default: campaign.rounds).")
    p.add_argument("--out", type=Path, default=Path("runs/tinyworld"), help="Run directory.")
    p.add_argument("--mode", choices=["rs", "ppo", "rs+ppo"], default=None, help="Override campaign.mode.")
    p.add_argument("--force", action="store_true", help="Reuse a run directory made by another recipe "
                   "(its stages are run again).")
    p.set_defaults(func=cmd_round)

    for name, fn, text in (("rs", cmd_rs, "One rejection-sampling round: sample, score, select, fine-tune."),
                           ("ppo", cmd_ppo, "One PPO stage on top of the round's RS checkpoint (resumable).")):
        p = sub.add_parser(name, help=text)
        _add_recipe_args(p)
        p.add_argument("--round", type=_positive("--round"), required=True, help="Round K (1 = from the base).")
        p.add_argument("--out", type=Path, default=Path("runs/tinyworld"), help="Run directory.")
        p.add_argument("--mode", choices=["rs", "ppo", "rs+ppo"], default=None, help="Override campaign.mode.")
        p.add_argument("--force", action="store_true", help="Reuse a run directory made by another recipe.")
        p.set_defaults(func=fn)

    p = sub.add_parser("sft", help="Fine-tune a policy on (prompt, response) rows, e.g. a round's selected.jsonl.")
    _add_recipe_args(p)
    p.add_argument("--data", type=Path, required=True, help="JSONL with 'prompt' and 'response' columns.")
    p.add_argument("--out", type=Path, required=True, help="Checkpoint folder.")
    p.add_argument("--init", default=None, help="Initial checkpoint (default: model.policy, the base).")
    p.add_argument("--seed", type=int, default=None, help="Training seed (default: the recipe's seed).")
    p.set_defaults(func=cmd_sft)

    rm = sub.add_parser("rm", help="Reward models: train one, evaluate both.")
    rms = rm.add_subparsers(dest="rm_command", required=True, metavar="ACTION")
    p = rms.add_parser("train", help="Train the helpfulness or safety RM with the margin ranking loss.")
    _add_recipe_args(p)
    p.add_argument("--kind", choices=["helpful", "safety"], required=True, help="Which reward model.")
    p.add_argument("--out", type=Path, required=True, help="Checkpoint folder.")
    p.add_argument("--init", default=None, help="Initial checkpoint (default: reward.<kind>.init).")
    p.set_defaults(func=cmd_rm_train)
    p = rms.add_parser("eval", help="Accuracy per preference level (Llama 2 Table 8), histograms, gate P/R.")
    _add_recipe_args(p)
    p.add_argument("--helpful", required=True, help="Helpfulness RM checkpoint.")
    p.add_argument("--safety", required=True, help="Safety RM checkpoint.")
    p.add_argument("--out", type=Path, required=True, help="Report folder.")
    p.set_defaults(func=cmd_rm_eval)

    p = sub.add_parser("score", help="Score (prompt, response) rows with both RMs and the gate.")
    _add_recipe_args(p)
    p.add_argument("--input", type=Path, required=True, help="JSONL with prompt, response (, is_safety).")
    p.add_argument("--out", type=Path, required=True, help="Output JSONL.")
    p.add_argument("--helpful", required=True, help="Helpfulness RM checkpoint.")
    p.add_argument("--safety", required=True, help="Safety RM checkpoint.")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("report", help="Write and print a campaign's report (JSON, Markdown, HTML, plots).")
    p.add_argument("dir", type=Path, help="Run directory.")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("compare", help="Set campaigns side by side (table and plot) for ablations.")
    p.add_argument("dirs", type=Path, nargs="+", help="Run directories.")
    p.add_argument("--out", type=Path, default=None, help="Where to write compare.{json,md,png}.")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from ._quiet import cpu_threads, quiet_libraries

    try:
        cpu_threads()  # first: it sets OMP_WAIT_POLICY before torch loads its OpenMP runtime
        quiet_libraries()
        args.func(args)
    except AwaitingAnnotations as e:
        from rich.markup import escape

        from .console import console

        console.print(f"[yellow]waiting:[/yellow] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 3
    except UserError as e:
        from rich.markup import escape

        from .console import console

        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        from .console import console

        console.print("[yellow]interrupted[/yellow]: finished stages are kept; rerun the same command to continue")
        return 130
    finally:
        _close_process_group()
    return 0


def _close_process_group() -> None:
    """Destroy the process group a launched stage (``accelerate launch``) opened, before the interpreter exits.

    Left to the interpreter's teardown, gloo's threads can abort a process whose work
    is done ("terminate called without an active exception", exit -6), which fails the
    launch; torch asks for ``destroy_process_group`` before exit for this reason.
    """
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # vLLM starts workers with spawn: keep the entry point guarded
    sys.exit(main())

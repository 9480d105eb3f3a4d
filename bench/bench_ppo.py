"""One PPO iteration: ours (iterative_rlhf.ppo) vs TRL 1.12's ``trl.experimental.ppo.PPOTrainer``, on the CPU.

Both sides get the same policy, reward model, prompts, batch (64 rollouts,
4 mini-batches of 16, one PPO epoch: Llama 2's one step per mini-batch),
response length and temperature. Each side runs in its own process (TRL 1.12
in its own virtual environment, ``.cache/bench-trl112``), runs a few
iterations, and reports the median wall and CPU seconds per iteration over the
iterations after the first (warm-up), and the process's peak RSS
(``resource.getrusage``). One torch thread: on this machine's 2 shared cores a
second OpenMP thread spin-waits, and CPU seconds are the figure that other jobs
on the machine disturb least.
Ours scores with the full gated scorer (two reward models, here two copies of
the same RM) where TRL reads one reward model: the comparison is of the
pipeline as used, not of equal work.

Commands (from the repository root)::

    python bench/bench_ppo.py setup                 # TRL 1.12 venv + bench models under .cache/
    python bench/bench_ppo.py compare               # both sides -> bench/results/ppo_cpu.json
    python bench/bench_ppo.py tinyworld             # PPO settings search on TinyWorld with the gold judge

``compare --model random25m`` uses a ~25M-parameter random Llama with the
TinyWorld tokenizer instead of the TinyWorld policy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench-ppo"
TRL_VENV = REPO / ".cache" / "bench-trl112"
RESULTS = REPO / "bench" / "results"

BATCH, MINI_BATCH, EPOCHS, RESPONSE_LENGTH, TEMPERATURE, KL_COEF, LR = 64, 16, 1, 24, 1.0, 0.05, 1e-5


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_prompts(n: int = 256) -> list[dict]:
    """TinyWorld train prompts (plain JSON, so the TRL side can read them without our package)."""
    return json.loads((CACHE / "prompts.json").read_text())[:n]


# --------------------------------------------------------------------------- setup


def setup(args: argparse.Namespace) -> None:
    if not (TRL_VENV / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        pip = [str(TRL_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the local CPU build first
        subprocess.run([*pip, "trl==1.12.*"], check=True)
    subprocess.run([str(TRL_VENV / "bin" / "python"), "-c",
                    "import trl, transformers, torch; from trl.experimental.ppo import PPOTrainer; "
                    "print('TRL venv: trl', trl.__version__, 'transformers', transformers.__version__, "
                    "'torch', torch.__version__)"], check=True, env={**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"})
    make_models(args.world_config)


def make_models(world_config: str) -> None:
    """Bench checkpoints: the TinyWorld policy, a 25M random Llama, and a reward model for each."""
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from iterative_rlhf.checkpoint import load_tokenizer
    from iterative_rlhf.config import TinyWorldConfig
    from iterative_rlhf.tinyworld.build import build_world
    from iterative_rlhf.tinyworld.world import get_prompts

    if world_config == "tests":
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import small_world_config

        cfg = small_world_config()
    else:
        cfg = TinyWorldConfig()
    world = build_world(cfg)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "prompts.json").write_text(json.dumps([{"prompt": p.text, "is_safety": p.is_safety}
                                                    for p in get_prompts("train")]))
    tok = load_tokenizer(str(world.policy))
    dst = CACHE / "tinyworld" / "policy"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(world.policy, dst)
    torch.manual_seed(0)
    big = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(big)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(CACHE / "random25m" / "policy")
    tok.save_pretrained(CACHE / "random25m" / "policy")
    n = sum(p.numel() for p in model.parameters())
    for name in ("tinyworld", "random25m"):
        pol = CACHE / name / "policy"
        rm = AutoModelForSequenceClassification.from_pretrained(str(pol), num_labels=1)
        torch.manual_seed(1)
        torch.nn.init.normal_(rm.score.weight, std=1.0 / rm.config.hidden_size ** 0.5)
        rm.config.pad_token_id = tok.pad_token_id
        rm.save_pretrained(CACHE / name / "rm")
        tok.save_pretrained(CACHE / name / "rm")
    print(f"bench models in {CACHE} (random25m: {n / 1e6:.1f}M parameters)")


# --------------------------------------------------------------------------- ours


def run_ours(args: argparse.Namespace) -> dict:
    os.environ.setdefault("ITERATIVE_RLHF_NO_PROGRESS", "1")
    import accelerate  # noqa: F401 - imported before the baseline: run_ppo imports them anyway
    import torch
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification  # noqa: F401

    import iterative_rlhf.scorer  # noqa: F401
    from iterative_rlhf.config import load_recipe
    from iterative_rlhf.ppo import run_ppo
    from iterative_rlhf.rlmath import WhitenStats

    torch.set_num_threads(args.threads)
    import_rss = peak_rss_mib()  # memory of the libraries; run_rss_mib is what the run adds
    base = CACHE / args.model
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    recipe = load_recipe(None, overrides=[
        f"ppo.iterations={args.iterations}", f"ppo.batch_size={BATCH}", f"ppo.mini_batch_size={MINI_BATCH}",
        f"ppo.ppo_epochs={EPOCHS}", f"ppo.temperature={TEMPERATURE}", f"ppo.kl_coef={KL_COEF}",
        f"ppo.learning_rate={LR:f}", "ppo.value_init=reward", f"ppo.eval_every={10 * args.iterations}",
        f"ppo.save_every={10 * args.iterations}", "ppo.early_stopping_patience=0",
        f"generation.max_new_tokens={RESPONSE_LENGTH}", f"generation.batch_size={BATCH}", "scorer.whiten=false",
        *(args.set or [])])
    prompts = bench_prompts()
    t0 = time.perf_counter()
    run_ppo(recipe, policy_path=str(base / "policy"), helpful_rm=str(base / "rm"), safety_rm=str(base / "rm"),
            out_dir=out, prompts=prompts, eval_prompts=prompts[:8], whiten=WhitenStats(0.0, 1.0), seed=0)
    total = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    its = [r for r in rows if r["iteration"] >= 1]
    # the iteration's own work: eval (run at the last iteration only) and state saving are left out
    secs = [r["time_generation"] + r["time_scoring"] + r["time_training"] + r["time_sync"] for r in its]
    cpu = [r["cpu_seconds"] for r in its]

    split = ("generation", "scoring", "rollout_forward", "update")
    return {"side": "ours", "python": sys.executable, "transformers": transformers.__version__,
            "overrides": args.set or [], "mixed_precision": recipe.ppo.mixed_precision,
            "rollout_logprobs": recipe.ppo.rollout_logprobs,
            "model": args.model, "seconds_per_iteration": statistics.median(secs[1:] or secs),
            "cpu_seconds_per_iteration": statistics.median(cpu[1:] or cpu), "iteration_seconds": secs,
            "peak_rss_mib": peak_rss_mib(), "import_rss_mib": import_rss,
            "run_rss_mib": peak_rss_mib() - import_rss, "total_seconds": total,
            "time_split": {k: statistics.median(r[f"time_{k}"] for r in its[1:] or its) for k in split},
            "cpu_split": {k: statistics.median(r[f"cpu_{k}"] for r in its[1:] or its) for k in split},
            "rollout_logprobs_from_engine": statistics.mean(r["rollout_logprobs_from_engine"] for r in its),
            "response_length": statistics.mean(r["response_length"] for r in its)}


# --------------------------------------------------------------------------- TRL 1.12


def run_trl(args: argparse.Namespace) -> dict:
    """TRL 1.12 PPOTrainer with the same model, prompts and sizes (run with the TRL venv's python)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.set_num_threads(args.threads)
    import_rss = peak_rss_mib()  # memory of the libraries; run_rss_mib is what the run adds
    base = CACHE / args.model
    tok = AutoTokenizer.from_pretrained(base / "policy", padding_side="left")
    prompts = bench_prompts()
    ids = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True,
                                   tokenize=True, return_dict=True)["input_ids"] for p in prompts]
    train = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(base / "policy")
    ref = AutoModelForCausalLM.from_pretrained(base / "policy")
    value = AutoModelForSequenceClassification.from_pretrained(base / "rm", num_labels=1)
    reward = AutoModelForSequenceClassification.from_pretrained(base / "rm", num_labels=1)
    out = Path(args.out)
    cfg = PPOConfig(
        output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        num_mini_batches=BATCH // MINI_BATCH, num_ppo_epochs=EPOCHS, local_rollout_forward_batch_size=BATCH,
        total_episodes=BATCH * args.iterations, response_length=RESPONSE_LENGTH, temperature=TEMPERATURE,
        kl_coef=KL_COEF, learning_rate=LR, lr_scheduler_type="constant", stop_token="eos",
        num_sample_generations=0, save_strategy="no", report_to=[], logging_steps=1, seed=0, use_cpu=True,
        bf16=args.bf16, fp16=False, disable_tqdm=True, adam_beta2=0.95, adam_epsilon=1e-5, weight_decay=0.1,
        max_grad_norm=1.0, dataloader_num_workers=0, gradient_checkpointing=not args.no_gradient_checkpointing)
    stamps: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):  # noqa: ANN002, ANN003, ANN201
            stamps.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *a, **k):  # noqa: ANN002, ANN003, ANN201
            stamps.append((time.perf_counter(), time.process_time()))

    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=train, eval_dataset=train.select(range(8)),
                         callbacks=[Clock()])
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    secs = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)]
    import transformers

    return {"side": "trl", "gradient_checkpointing": cfg.gradient_checkpointing, "bf16": cfg.bf16,
            "python": sys.executable,
            "trl_version": trl.__version__,
            "transformers": transformers.__version__, "model": args.model,
            "seconds_per_iteration": statistics.median(secs[1:] or secs),
            "cpu_seconds_per_iteration": statistics.median(cpu[1:] or cpu), "iteration_seconds": secs,
            "peak_rss_mib": peak_rss_mib(), "import_rss_mib": import_rss, "run_rss_mib": peak_rss_mib() - import_rss,
            "total_seconds": total}


# --------------------------------------------------------------------------- compare


def compare(args: argparse.Namespace) -> None:
    """Run TRL 1.12 and ours (in our venv, and in TRL's venv: same libraries as TRL) and write the ratios."""
    results = {}
    common = ["--model", args.model, "--iterations", str(args.iterations), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRL_EXPERIMENTAL_SILENCE": "1", "ITERATIVE_RLHF_NO_PROGRESS": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    trl_python = str(TRL_VENV / "bin" / "python")
    # TRL as shipped (its PPOConfig turns gradient checkpointing on; float32 as the bench sets bf16=False), TRL
    # without gradient checkpointing, TRL with bf16 mixed precision; ours with the defaults (float32), ours with
    # ppo.mixed_precision=bf16, ours in TRL's venv (float32 and bf16)
    bf16 = ["--set", "ppo.mixed_precision=bf16"]
    all_runs = {"trl": ("trl", trl_python, []), "trl_no_gc": ("trl", trl_python, ["--no-gradient-checkpointing"]),
                "trl_bf16": ("trl", trl_python, ["--bf16"]), "ours": ("ours", sys.executable, []),
                "ours_bf16": ("ours", sys.executable, bf16), "ours_trl_venv": ("ours", trl_python, []),
                "ours_bf16_trl_venv": ("ours", trl_python, bf16)}
    runs = [(k, *all_runs[k]) for k in args.runs.split(",")]
    for key, side, python, extra in runs:
        out = CACHE / "runs" / f"{key}-{args.model}"
        js = CACHE / f"{key}-{args.model}.json"
        cmd = [python, str(Path(__file__).resolve()), side, *common, *extra, "--out", str(out), "--json", str(js)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env, cwd=REPO)
        results[key] = json.loads(js.read_text())
    summary = {
        "device": "cpu", "threads": args.threads, "model": args.model, "batch": BATCH, "mini_batch": MINI_BATCH,
        "ppo_epochs": EPOCHS, "response_length": RESPONSE_LENGTH, "iterations": args.iterations,
        "command": f"python bench/bench_ppo.py compare --model {args.model} --iterations {args.iterations} "
                   f"--threads {args.threads}",
        **results,
    }
    lines = []
    for key in [k for k in results if k.startswith("ours")]:
        r = results[key]
        for ref in [k for k in results if k.startswith("trl")]:
            t = results[ref]
            speed = summary[f"speedup_{key}_vs_{ref}"] = t["seconds_per_iteration"] / r["seconds_per_iteration"]
            cpu = summary[f"cpu_speedup_{key}_vs_{ref}"] = \
                t["cpu_seconds_per_iteration"] / r["cpu_seconds_per_iteration"]
            peak = summary[f"peak_rss_ratio_{key}_vs_{ref}"] = r["peak_rss_mib"] / t["peak_rss_mib"]
            lines.append(f"{key} vs {ref}: {r['seconds_per_iteration']:.2f} vs {t['seconds_per_iteration']:.2f} "
                         f"s/iteration (speed-up {speed:.2f}x; CPU seconds {r['cpu_seconds_per_iteration']:.2f} vs "
                         f"{t['cpu_seconds_per_iteration']:.2f}, {cpu:.2f}x); peak RSS {r['peak_rss_mib']:.0f} vs "
                         f"{t['peak_rss_mib']:.0f} MiB (ratio {peak:.2f})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "ppo_cpu.json" if args.model == "tinyworld" else f"ppo_cpu_{args.model}.json"
    (RESULTS / name).write_text(json.dumps(summary, indent=2) + "\n")
    print("\n".join(lines))
    print(f"-> {RESULTS / name}")


# --------------------------------------------------------------------------- TinyWorld settings search


def tinyworld(args: argparse.Namespace) -> None:
    """PPO on the TinyWorld base policy with the gold judge as the scorer; gold/KL per iteration."""
    os.environ.setdefault("ITERATIVE_RLHF_NO_PROGRESS", "1")
    import torch

    from iterative_rlhf.config import TinyWorldConfig, load_recipe
    from iterative_rlhf.ppo import run_ppo
    from iterative_rlhf.tinyworld.build import build_world
    from iterative_rlhf.tinyworld.evaluate import GoldScorer
    from iterative_rlhf.tinyworld.world import get_prompts, metrics

    torch.set_num_threads(args.threads)

    if args.world_config == "tests":
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import small_world_config

        world = build_world(small_world_config())
    else:
        world = build_world(TinyWorldConfig())
    train = [{"prompt": p.text, "is_safety": p.is_safety} for p in get_prompts("train")]
    evalp = [{"prompt": p.text, "is_safety": p.is_safety} for p in get_prompts("eval")]
    overrides = args.set or []
    recipe = load_recipe(None, overrides=overrides)
    out = CACHE / "tinyworld-runs" / (args.name or "run")
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    # --rm-dir: the learned RMs (helpful/, safety/) through the GatedScorer; default: the gold judge
    rms = Path(args.rm_dir) if args.rm_dir else None
    run_ppo(recipe, policy_path=str(world.policy), helpful_rm=str(rms / "helpful") if rms else "-",
            safety_rm=str(rms / "safety") if rms else "-", out_dir=out, prompts=train, eval_prompts=evalp,
            scorer=None if rms else GoldScorer(), seed=args.seed,
            eval_metrics=lambda rows, rs: metrics([(r["prompt"], x) for r, x in zip(rows, rs, strict=True)]))
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    table = [{k: r.get(k) for k in ("iteration", "reward", "kl", "entropy", "response_length", "eval_reward",
                                    "eval_gold", "eval_helpful_rate", "eval_violation_rate",
                                    "eval_false_refusal_rate") if k in r} for r in rows]
    result = {"world": args.world_config, "scorer": "gated (learned RMs)" if rms else "gold judge",
              "overrides": overrides, "seed": args.seed, "wall_seconds": wall, "rows": table}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "ppo_tinyworld.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"name": args.name, **result}) + "\n")
    for r in table:
        print(json.dumps(r))
    print(f"wall {wall:.0f}s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--world-config", choices=["default", "tests"], default="default")
    for name in ("ours", "trl", "compare"):
        p = sub.add_parser(name)
        p.add_argument("--model", choices=["tinyworld", "random25m"], default="tinyworld")
        p.add_argument("--iterations", type=int, default=4)
        p.add_argument("--threads", type=int, default=1,
                       help="torch threads (1: the 2 shared cores make OpenMP spin-waits dominate at 2)")
        p.add_argument("--out", default=str(CACHE / "runs" / name))
        p.add_argument("--json", default=None)
        p.add_argument("--no-gradient-checkpointing", action="store_true", help="TRL side: turn it off")
        p.add_argument("--bf16", action="store_true", help="TRL side: bf16 mixed precision (TrainingArguments.bf16)")
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="our side: recipe overrides")
        p.add_argument("--runs", default="trl,trl_bf16,ours,ours_bf16,ours_trl_venv,ours_bf16_trl_venv",
                       help="compare: which runs (of trl, trl_no_gc, trl_bf16, ours, ours_bf16, ours_trl_venv, "
                            "ours_bf16_trl_venv)")
    t = sub.add_parser("tinyworld")
    t.add_argument("--set", action="append", metavar="KEY=VALUE")
    t.add_argument("--name", default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--world-config", choices=["default", "tests"], default="default")
    t.add_argument("--rm-dir", default=None, help="folder with helpful/ and safety/ RMs: score with the GatedScorer")
    args = ap.parse_args()
    if args.cmd == "setup":
        setup(args)
    elif args.cmd == "compare":
        compare(args)
    elif args.cmd == "tinyworld":
        tinyworld(args)
    else:
        res = (run_ours if args.cmd == "ours" else run_trl)(args)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=2))
        print(json.dumps({k: v for k, v in res.items() if k != "iteration_seconds"}))


if __name__ == "__main__":
    main()

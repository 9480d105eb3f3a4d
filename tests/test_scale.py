"""Scale: training in two processes (accelerate launch, gloo on the CPU), QLoRA on the CPU, launched campaigns.

Two-process runs are checked against one-process runs with the same global
batch: reward-model training (the TRL trainer under DDP) must give the same
losses and weights; a PPO update (``ppo_update`` with DDP gradient averaging)
on fixed rollouts must give the same updated policy and value weights.
QLoRA: reward models, PPO and SFT train LoRA adapters on 4-bit and 8-bit
bitsandbytes weights; the saved checkpoints are standalone full-precision
models whose weights differ from the base by exactly a low-rank update (the
adapter merged into the full-precision base, not into rounded 4/8-bit weights).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from iterative_rlhf.config import load_recipe
from iterative_rlhf.errors import UserError
from iterative_rlhf.launch import accelerate_command, launch_env

REPO = Path(__file__).resolve().parents[1]
TWO_CPU = REPO / "tests" / "fixtures" / "accelerate" / "cpu2.yaml"
PPO_STEP = REPO / "tests" / "fixtures" / "ppo_update_step.py"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def world_overrides(world_config) -> list[str]:  # noqa: ANN001
    """``--set`` items that make a CLI process use the tests' TinyWorld (the ``world`` fixture's cache)."""
    import dataclasses

    return [f"tinyworld.{k}={v}" for k, v in dataclasses.asdict(world_config).items()]


def sets(items: list[str]) -> list[str]:
    return [x for item in items for x in ("--set", item)]


def run_cli(argv: list[str], processes: int) -> None:
    """``iterative-rlhf ARGV`` in one process, or under ``accelerate launch`` in ``processes`` processes."""
    if processes == 1:
        cmd = [sys.executable, "-m", "iterative_rlhf.cli", *argv]
    else:
        cmd = accelerate_command(TWO_CPU, argv, num_processes=processes)
    proc = subprocess.run(cmd, env=launch_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- two processes


RM_SETTINGS = ["reward.helpful.batch_size=16", "reward.helpful.per_device_batch_size=8", "reward.helpful.epochs=0.1"]


def _rm_runs(root: Path, world_config, prompts_per_batch: int) -> tuple[Path, Path]:  # noqa: ANN001
    settings = [*RM_SETTINGS, f"reward.helpful.prompts_per_batch={prompts_per_batch}"]
    argv = ["rm", "train", "--kind", "helpful", *sets(world_overrides(world_config) + settings)]
    for n in (1, 2):
        run_cli([*argv, "--out", str(root / f"p{n}")], processes=n)
    return root / "p1", root / "p2"


@pytest.fixture(scope="module")
def rm_runs(world, world_config, tmp_path_factory):
    """The helpfulness RM trained by ``iterative-rlhf rm train`` in one process and in two (16 pairs per step)."""
    return _rm_runs(tmp_path_factory.mktemp("rm_runs"), world_config, 0)


@pytest.fixture(scope="module")
def rm_runs_shared(world, world_config, tmp_path_factory):
    """The same with 8 pairs of each of 2 prompts per step, each distinct response scored once."""
    return _rm_runs(tmp_path_factory.mktemp("rm_runs_shared"), world_config, 2)


@pytest.mark.slow
@pytest.mark.parametrize("runs", ["rm_runs", "rm_runs_shared"])
def test_reward_model_training_in_two_processes_matches_one_process(runs, request):
    one, two = request.getfixturevalue(runs)
    s1 = json.loads((one / "train_summary.json").read_text())
    s2 = json.loads((two / "train_summary.json").read_text())
    assert (s1["processes"], s2["processes"]) == (1, 2)
    assert s1["prompts_per_batch"] == s2["prompts_per_batch"] == (2 if runs == "rm_runs_shared" else 0)
    assert s1["batch_size"] == s2["batch_size"] == 16 and s1["steps"] == s2["steps"] >= 5
    l1 = [r["loss"] for r in read_jsonl(one / "train_log.jsonl") if "loss" in r]
    l2 = [r["loss"] for r in read_jsonl(two / "train_log.jsonl") if "loss" in r]
    assert len(l1) == len(l2) == s1["steps"]
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)  # the same pairs per step, DDP's mean = accumulation's
    w1, w2 = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert set(w1) == set(w2)
    init = load_file(str(Path(s1["init"]) / "model.safetensors"))
    moved = max(float((w1[k] - init[k]).abs().max()) for k in w1 if k in init)
    diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    assert moved > 1e-3 and diff < 1e-5, (moved, diff)


def _fixed_rollouts(world, n: int = 8, length: int = 6) -> dict:
    """``n`` sampled responses of the TinyWorld policy, cut to ``length`` tokens (equal per-process token counts)."""
    from iterative_rlhf.checkpoint import load_tokenizer
    from iterative_rlhf.config import GenerationConfig
    from iterative_rlhf.generation import HFEngine, chat_prompts

    rows = read_jsonl(world.prompts("train"))[:64]
    engine = HFEngine(str(world.policy), GenerationConfig(batch_size=64))
    comps = [c[0] for c in engine.generate([r["prompt"] for r in rows], 1, 1.0, 12, seed=0)]
    keep = [(r, c) for r, c in zip(rows, comps, strict=True) if len(c.token_ids) >= length][:n]
    assert len(keep) == n
    tok = load_tokenizer(str(world.policy))
    prompts = [r["prompt"] for r, _ in keep]
    responses = [c.token_ids[:length] for _, c in keep]
    return {"prompts": prompts, "is_safety": [bool(r["is_safety"]) for r, _ in keep],
            "queries": tok(chat_prompts(tok, prompts), add_special_tokens=False)["input_ids"],
            "responses": responses, "texts": [tok.decode(x, skip_special_tokens=True).strip() for x in responses]}


@pytest.mark.slow
def test_ppo_update_in_two_processes_matches_one_process(world, rm_runs, tmp_path):
    helpful = str(rm_runs[0])
    spec = {"policy": str(world.policy), "helpful_rm": helpful, "safety_rm": helpful, **_fixed_rollouts(world),
            "overrides": ["ppo.batch_size=8", "ppo.mini_batch_size=8", "ppo.ppo_epochs=2", "ppo.value_init=reward",
                          "ppo.learning_rate=0.003", "ppo.value_learning_rate=0.003"]}
    out = {}
    for n in (1, 2):
        out[n] = tmp_path / f"p{n}"
        f = tmp_path / f"spec{n}.json"
        f.write_text(json.dumps({**spec, "out": str(out[n])}))
        if n == 1:
            cmd = [sys.executable, str(PPO_STEP), str(f)]
        else:
            cmd = accelerate_command(TWO_CPU, [str(f)], num_processes=2, program=[str(PPO_STEP)])
        proc = subprocess.run(cmd, env=launch_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-5000:]
    m1, m2 = (json.loads((out[n] / "metrics.json").read_text()) for n in (1, 2))
    assert (m1["processes"], m2["processes"]) == (1, 2)
    assert m1["scores"] == pytest.approx(m2["scores"], abs=1e-6)
    for key in ("pg_loss", "vf_loss", "approx_kl", "clipfrac", "grad_norm", "value_grad_norm"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-4, abs=1e-6), key
    assert m1["clipfrac"] > 0 or m1["approx_kl"] > 0  # the second epoch saw a changed policy
    from iterative_rlhf.checkpoint import load_causal_lm

    weights = {}
    for name in ("policy", "value"):
        w1, w2 = weights[name] = [load_file(str(out[n] / f"{name}.safetensors")) for n in (1, 2)]
        assert set(w1) == set(w2)
        diff = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
        assert diff < 1e-5, (name, diff)
    base = load_causal_lm(str(world.policy)).state_dict()
    policy = weights["policy"][0]
    assert max(float((policy[k] - base[k]).abs().max()) for k in policy) > 1e-3  # the update moved the policy


# --------------------------------------------------------------------------- QLoRA on the CPU

LORA_R = 4


def qlora(section: str, bits: int) -> list[str]:
    """LoRA r=4 on the attention projections over ``bits``-bit bitsandbytes weights (bf16 compute, as the recipes)."""
    return [f"{section}.lora.enabled=true", f"{section}.lora.r={LORA_R}", f"{section}.lora.alpha={2 * LORA_R}",
            f"{section}.quant.load_in_{bits}bit=true"]


def assert_standalone_lora_merge(out: Path, base_dir: Path, adapter: dict[str, torch.Tensor] | None = None) -> None:
    """``out`` is a plain full-precision checkpoint: no bitsandbytes config, the adapted projections differ from
    the base by a rank-``LORA_R`` update (equal to ``adapter``'s B @ A * alpha/r when given), other weights equal."""
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    saved, base = load_file(str(out / "model.safetensors")), load_file(str(base_dir / "model.safetensors"))
    assert saved["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    changed = 0
    for key, w in saved.items():
        if key not in base:
            continue  # the reward model's fresh head
        delta = (w - base[key]).double()
        if any(f".{m}." in key for m in ("q_proj", "k_proj", "v_proj", "o_proj")):
            assert int(torch.linalg.matrix_rank(delta, atol=1e-6)) <= LORA_R, key
            changed += bool(delta.abs().max() > 1e-6)
            if adapter is not None:
                prefix = key.removesuffix(".weight")
                a = next(v for k, v in adapter.items() if prefix in k and "lora_A" in k).double()
                b = next(v for k, v in adapter.items() if prefix in k and "lora_B" in k).double()
                torch.testing.assert_close(delta, b @ a * 2.0, atol=1e-6, rtol=1e-4)  # alpha / r = 2
        else:
            assert torch.equal(w, base[key]), key  # never rounded through 4/8 bits
    assert changed > 0  # the adapters trained


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_reward_model_trains_and_saves_a_full_precision_checkpoint(world, tmp_path, bits):
    from transformers import AutoModelForSequenceClassification

    from iterative_rlhf.reward import rm_datasets, train_reward_model
    from iterative_rlhf.scorer import RewardModelScorer

    recipe = load_recipe(None, [*qlora("reward.helpful", bits), "reward.helpful.batch_size=8",
                                "reward.helpful.per_device_batch_size=8", "reward.helpful.learning_rate=0.005"])
    train, _ = rm_datasets(recipe, "helpful", world)
    out = train_reward_model(recipe, "helpful", tmp_path / "rm", init_path=world.policy,
                             train_ds=train.select(range(32)))
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["quantized"] and summary["lora"] and summary["steps"] == 8
    assert all(math.isfinite(r["loss"]) for r in read_jsonl(out / "train_log.jsonl") if "loss" in r)
    assert_standalone_lora_merge(out, world.policy)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())
    scores = RewardModelScorer(out).score(["Add 2 and 3."], ["5"])
    assert scores.shape == (1,) and torch.isfinite(scores).all()


class LaterEvaluationsFirst:
    """The gated scorer, except that every held-out evaluation (``n_eval`` rows) scores 1 more than the last one,
    so PPO's best checkpoint is the trained policy and its QLoRA merge path runs (rollouts keep the real reward)."""

    def __init__(self, scorer, n_eval: int) -> None:  # noqa: ANN001
        self.scorer, self.n_eval, self.evals = scorer, n_eval, 0

    def score(self, prompts, responses, is_safety):  # noqa: ANN001, ANN201
        s = self.scorer.score(prompts, responses, is_safety)
        if len(prompts) == self.n_eval:
            self.evals += 1
            s.reward = s.reward + self.evals
        return s

    def set_whitening(self, stats) -> None:  # noqa: ANN001
        self.scorer.set_whitening(stats)

    def close(self) -> None:
        self.scorer.close()


@pytest.fixture(scope="module")
def probe_rm(world, tmp_path_factory):
    """A small full-precision reward model (a few steps of RM training) for the PPO tests."""
    from iterative_rlhf.reward import rm_datasets, train_reward_model

    recipe = load_recipe(None, ["reward.helpful.batch_size=16", "reward.helpful.per_device_batch_size=16"])
    train, _ = rm_datasets(recipe, "helpful", world)
    return train_reward_model(recipe, "helpful", tmp_path_factory.mktemp("probe_rm") / "rm", init_path=world.policy,
                              train_ds=train.select(range(64)))


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_ppo_updates_the_adapter_and_saves_it_merged_into_full_precision(world, probe_rm, tmp_path, bits):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from iterative_rlhf.ppo import run_ppo
    from iterative_rlhf.scorer import GatedScorer

    recipe = load_recipe(None, [*qlora("ppo", bits), "ppo.iterations=1", "ppo.batch_size=8", "ppo.mini_batch_size=4",
                                "ppo.eval_every=1", "ppo.learning_rate=0.003", "generation.max_new_tokens=8"])
    train, evalp = read_jsonl(world.prompts("train"))[:16], read_jsonl(world.prompts("eval"))[:6]
    scorer = LaterEvaluationsFirst(GatedScorer(probe_rm, probe_rm, recipe.scorer), n_eval=len(evalp))
    out = run_ppo(recipe, policy_path=str(world.policy), helpful_rm=str(probe_rm), safety_rm=str(probe_rm),
                  out_dir=tmp_path / "ppo", prompts=train, eval_prompts=evalp, seed=0, scorer=scorer)
    summary = json.loads((tmp_path / "ppo" / "summary.json").read_text())
    assert summary["best_iteration"] == 1
    adapter = load_file(str(tmp_path / "ppo" / "state" / "policy.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(float(v.abs().max()) > 0 for v in lora_b)  # LoRA B starts at zero: the update moved it
    assert_standalone_lora_merge(out, world.policy, adapter)
    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_sft_saves_the_adapter_merged_into_full_precision(world, tmp_path, bits):
    from transformers import AutoModelForCausalLM

    from iterative_rlhf.sft import finetune

    recipe = load_recipe(None, [*qlora("sft", bits), "sft.batch_size=4", "sft.per_device_batch_size=4",
                                "sft.epochs=1", "sft.learning_rate=0.005"])
    rows = [{"prompt": r["prompt"], "response": "I can't help with that."}
            for r in read_jsonl(world.prompts("train"))[:12]]
    out = finetune(recipe, rows, str(world.policy), tmp_path / "sft", seed=0)
    assert_standalone_lora_merge(out, world.policy)
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl") if "train_loss" in r] == [3]
    AutoModelForCausalLM.from_pretrained(out)


def test_sft_safety_weight_repeats_the_safety_prompts_samples(world, tmp_path, capsys):
    from iterative_rlhf.sft import finetune, weighted_rows

    rows = [{"prompt": r["prompt"], "response": "I can't help with that." if r["is_safety"] else "7",
             "is_safety": r["is_safety"]} for r in read_jsonl(world.prompts("train"))]
    rows = [r for r in rows if r["is_safety"]][:4] + [r for r in rows if not r["is_safety"]][:8]
    assert len(weighted_rows(rows, 1)) == 12 and len(weighted_rows(rows, 3)) == 20
    assert weighted_rows(rows, 3)[:3] == [rows[0]] * 3
    recipe = load_recipe(None, ["sft.safety_weight=3", "sft.batch_size=4", "sft.per_device_batch_size=4",
                                "sft.epochs=1"])
    out = finetune(recipe, rows, str(world.policy), tmp_path / "sft", seed=0)
    assert [r["step"] for r in read_jsonl(out / "train_log.jsonl") if "train_loss" in r] == [5]  # 20 rows / 4
    with pytest.raises(UserError, match="sft.safety_weight"):
        load_recipe(None, ["sft.safety_weight=0"])
    untagged = [{k: v for k, v in r.items() if k != "is_safety"} for r in rows[:4]]
    finetune(recipe, untagged, str(world.policy), tmp_path / "sft-untagged", seed=0)
    assert "no sample has an 'is_safety' field" in capsys.readouterr().err


def test_4bit_lora_gradients_survive_an_eval_pass_on_the_cpu(world):
    """Sampling (eval mode, no grad) must not change the gradients of a later training step (bitsandbytes' CPU
    inference repacking has no backward; iterative_rlhf.checkpoint.keep_4bit_trainable prevents it)."""
    from iterative_rlhf.checkpoint import apply_lora, load_causal_lm
    from iterative_rlhf.config import LoraConfig, QuantConfig

    x = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))

    def lora_grads(eval_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = load_causal_lm(str(world.policy), quant=QuantConfig(load_in_4bit=True, compute_dtype="float32"))
        model = apply_lora(model, LoraConfig(enabled=True, r=LORA_R, dropout=0.0), "CAUSAL_LM", quantized=True)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)  # a trained adapter: gradients reach lora_A too
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=x)
            model.train()
        model(input_ids=x).logits.logsumexp(-1).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, after_eval = lora_grads(False), lora_grads(True)
    assert len(plain) == 4 * 2 * 2  # q, k, v, o x lora_A, lora_B x 2 layers
    for name, g in plain.items():
        assert after_eval[name] is not None, name
        torch.testing.assert_close(after_eval[name], g, msg=name)
        assert float(g.abs().max()) > 0, name


# --------------------------------------------------------------------------- a campaign launching its stages


@pytest.mark.slow
def test_campaign_launches_rm_sft_and_ppo_through_accelerate_in_two_processes(world, world_config, tmp_path):
    out = tmp_path / "run"
    settings = [*world_overrides(world_config), f"campaign.accelerate_config={TWO_CPU}", "campaign.num_processes=2",
                *(f"reward.{k}.{x}" for k in ("helpful", "safety")
                  for x in ("epochs=0.1", "batch_size=16", "per_device_batch_size=8", "max_length=64")),
                "rs.n=2", "rs.prompts=32", "campaign.eval_samples=1", "sft.epochs=1", "sft.batch_size=8",
                "sft.per_device_batch_size=4", "ppo.iterations=1", "ppo.batch_size=16", "ppo.mini_batch_size=8",
                "ppo.eval_every=1", "campaign.ppo_from_round=1"]
    env = {**launch_env(), "ITERATIVE_RLHF_NO_PROGRESS": "1"}
    env.pop("ITERATIVE_RLHF_LAUNCHED")  # the campaign itself runs in one process and launches its stages
    proc = subprocess.run([sys.executable, "-m", "iterative_rlhf.cli", "round", "--n", "1", "--out", str(out),
                           *sets(settings)], env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = " ".join(proc.stderr.split())  # rich wraps long lines
    for stage, command in (("rm/helpful", "rm train --kind helpful"), ("rm/safety", "rm train --kind safety"),
                           ("v1/sft", "-m iterative_rlhf.cli sft --data"), ("v1/ppo", "ppo --round 1")):
        assert f"{stage}: -m accelerate.commands.launch --config_file {TWO_CPU} --num_processes 2" in log, stage
        assert command in log, command
    stages = json.loads((out / "manifest.json").read_text())["stages"]
    assert {"rm/helpful", "rm/safety", "rm/eval", "v1/sft", "v1/ppo", "v1/report"} <= set(stages)
    for kind in ("helpful", "safety"):
        assert json.loads((out / "rm" / kind / "train_summary.json").read_text())["processes"] == 2
    assert json.loads((out / "v1" / "ppo" / "summary.json").read_text())["processes"] == 2
    ppo_rows = read_jsonl(out / "v1" / "ppo" / "metrics.jsonl")
    assert [r["iteration"] for r in ppo_rows] == [0, 1] and math.isfinite(ppo_rows[1]["pg_loss"])
    from transformers import AutoModelForCausalLM

    # 32 selected samples, 8 per step (4 per process x 2 processes, no accumulation): 4 optimiser steps
    assert [r["step"] for r in read_jsonl(out / "v1" / "rs_policy" / "train_log.jsonl") if "train_loss" in r] == [4]
    for policy in (out / "v1" / "rs_policy", out / "v1" / "ppo" / "policy"):
        AutoModelForCausalLM.from_pretrained(policy)
    assert json.loads((out / "v1" / "report.json").read_text())["ppo"]["iterations"] == 1


# --------------------------------------------------------------------------- vLLM settings


def test_vllm_tensor_parallel_size_and_gpu_memory_utilization_come_from_the_recipe():
    from iterative_rlhf.generation import llm_engine_kwargs

    path = REPO / "recipes" / "llama2-7b-hh.yaml"
    gpu = llm_engine_kwargs("m", load_recipe(path).generation, seed=1, trust_remote_code=False, cpu=False)
    assert (gpu["tensor_parallel_size"], gpu["gpu_memory_utilization"], gpu["dtype"]) == (1, 0.4, "bfloat16")
    gen = load_recipe(path, ["generation.tensor_parallel_size=4", "generation.gpu_memory_utilization=0.3"]).generation
    gpu = llm_engine_kwargs("m", gen, seed=1, trust_remote_code=False, cpu=False)
    assert (gpu["tensor_parallel_size"], gpu["gpu_memory_utilization"], gpu["max_model_len"]) == (4, 0.3, 2048)
    cpu = llm_engine_kwargs("m", gen, seed=1, trust_remote_code=False, cpu=True)
    assert "gpu_memory_utilization" not in cpu and cpu["kv_cache_memory_bytes"] == gen.cpu_kv_cache_gb << 30
    # every name is an argument of the installed vLLM's engine
    arg_utils = pytest.importorskip("vllm.engine.arg_utils")
    import dataclasses

    known = {f.name for f in dataclasses.fields(arg_utils.EngineArgs)}
    assert set(gpu) - {"model"} <= known | {"tokenizer"} and set(cpu) <= known | {"model", "tokenizer"}

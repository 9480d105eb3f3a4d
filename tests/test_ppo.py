"""Tests of iterative_rlhf.ppo: batching, forward alignment, advantages, models, the loop and resume.

Fast tests use a tiny random Llama with a TinyWorld-style tokenizer. The slow
tests run PPO on the tests' TinyWorld (``world`` fixture): with the TinyWorld
gold judge as the scorer (a real reward, known exactly) and, end to end, with
the GatedScorer on two reward models fitted as linear probes of the policy.
GAE itself is checked against a loop in test_rlmath.py, not here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from iterative_rlhf import ppo
from iterative_rlhf.config import PPOConfig, TinyWorldConfig, load_recipe
from iterative_rlhf.errors import NumericalError, UserError
from iterative_rlhf.rlmath import WhitenStats, logprobs_from_logits, policy_loss
from iterative_rlhf.tinyworld.evaluate import GoldScorer

# --------------------------------------------------------------------------- helpers


# The exact reward: TinyWorld's gold judge (2 * gold - 1, then whitened).
JudgeScorer = GoldScorer


class NaNScorer(JudgeScorer):
    """NaN reward for the rollouts (batches of 4), finite for the held-out prompts."""

    def score(self, prompts, responses, is_safety):  # noqa: ANN001, ANN201
        s = super().score(prompts, responses, is_safety)
        if len(prompts) == 4:
            s.reward[0] = float("nan")
        return s


class CrashingScorer(JudgeScorer):
    """Raises on the n-th rollout batch (batches of exactly ``batch_size`` rows): a simulated crash."""

    def __init__(self, batch_size: int, crash_on: int) -> None:
        super().__init__()
        self.batch_size, self.crash_on, self.rollouts = batch_size, crash_on, 0

    def score(self, prompts, responses, is_safety):  # noqa: ANN001, ANN201
        if len(prompts) == self.batch_size:
            self.rollouts += 1
            if self.rollouts == self.crash_on:
                raise RuntimeError("simulated crash")
        return super().score(prompts, responses, is_safety)


def tinyworld_metrics(rows: list[dict], responses: list[str]) -> dict[str, float]:
    from iterative_rlhf.tinyworld.world import metrics

    return metrics([(r["prompt"], x) for r, x in zip(rows, responses, strict=True)])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny random Llama with a TinyWorld tokenizer and chat template (a valid checkpoint, ~30k params)."""
    from iterative_rlhf.tinyworld.policy import build_model, build_tokenizer
    from iterative_rlhf.tinyworld.world import get_prompts

    torch.manual_seed(0)
    texts = [p.text for p in get_prompts("all")] + ["Paris.", "I can't help with that.", "7"] * 10
    tok = build_tokenizer(texts, vocab_size=300)
    model = build_model(TinyWorldConfig(hidden_size=16, num_layers=1, num_heads=2), tok)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    out = tmp_path_factory.mktemp("tiny") / "policy"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_recipe(*overrides: str):  # noqa: ANN201
    return load_recipe(None, overrides=["ppo.iterations=2", "ppo.batch_size=4", "ppo.mini_batch_size=2",
                                        "ppo.value_init=policy", "generation.max_new_tokens=6",
                                        "generation.batch_size=8", *overrides])


# --------------------------------------------------------------------------- 1. rollout batching


def test_pad_rollouts_layout_and_masks():
    b = ppo.pad_rollouts([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0)
    assert b.query.tolist() == [[5, 6, 7], [0, 0, 8]]  # prompts left padded
    assert b.query_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b.response.tolist() == [[1, 2, 0], [3, 4, 9]]  # responses right padded: all start at column P
    assert b.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert b.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    one = b.select(torch.tensor([1]))  # trimmed to its own prompt and response
    assert one.query.tolist() == [[8]] and one.response.tolist() == [[3, 4, 9]]
    zero = b.select(torch.tensor([0]))
    assert zero.query.tolist() == [[5, 6, 7]] and zero.response.tolist() == [[1, 2]]
    assert len(b) == 2


def test_iteration_prompts_are_epochs_of_permutations():
    got = [ppo.iteration_prompts(10, 4, it, seed=3) for it in (1, 2, 3, 4, 5)]
    flat = sum(got, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert got == [ppo.iteration_prompts(10, 4, it, seed=3) for it in (1, 2, 3, 4, 5)]  # pure function
    assert got != [ppo.iteration_prompts(10, 4, it, seed=4) for it in (1, 2, 3, 4, 5)]


def test_rollout_batches_engine_output_with_response_masks(tiny_ckpt):
    from iterative_rlhf.checkpoint import load_causal_lm, load_tokenizer
    from iterative_rlhf.generation import HFEngine

    recipe = tiny_recipe()
    tok = load_tokenizer(str(tiny_ckpt))
    engine = HFEngine(str(tiny_ckpt), recipe.generation, model=load_causal_lm(str(tiny_ckpt)), tokenizer=tok)
    prompts = ["Add 2 and 3.", "What is the capital of France?", "Add 1 and 1."]
    batch, comps = ppo.rollout(engine, tok, prompts, temperature=1.0, max_new_tokens=6, seed=0)
    assert batch.response.shape == (3, max(len(c.token_ids) for c in comps))
    for i, c in enumerate(comps):
        n = len(c.token_ids)
        assert batch.response_mask[i].tolist() == [1] * n + [0] * (batch.response.shape[1] - n)
        assert batch.response[i, :n].tolist() == c.token_ids
        if c.finished:
            assert c.token_ids[-1] == tok.eos_token_id
        q = tok(ppo.chat_prompts(tok, [prompts[i]])[0], add_special_tokens=False)["input_ids"]
        assert batch.query[i, -len(q):].tolist() == q and int(batch.query_mask[i].sum()) == len(q)


def test_truncate_prompts_cuts_the_user_text_from_the_left(tiny_ckpt):
    from iterative_rlhf.checkpoint import load_tokenizer

    tok = load_tokenizer(str(tiny_ckpt))
    short, long = "Add 2 and 3.", " ".join(["What is the capital of France?"] * 8)
    out, n_cut = ppo.truncate_prompts(tok, [short, long], max_length=24)
    assert n_cut == 1 and out[0] == short and long.endswith(out[1].strip())
    rendered = tok(ppo.chat_prompts(tok, [out[1]])[0], add_special_tokens=False)["input_ids"]
    assert len(rendered) <= 24


# --------------------------------------------------------------------------- forward alignment


def _tiny_llama(seed: int = 0, token_cls: bool = False):  # noqa: ANN202
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForTokenClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
                      num_labels=1)
    return (LlamaForTokenClassification if token_cls else LlamaForCausalLM)(cfg).eval()


def test_policy_logits_and_values_match_unpadded_sequences():
    policy, value = _tiny_llama(0), _tiny_llama(1, token_cls=True)
    queries, responses = [[1, 5, 6, 7], [1, 9]], [[10, 11], [12, 13, 14, 2]]
    batch = ppo.pad_rollouts(queries, responses, pad_id=0)
    with torch.no_grad():
        lp = logprobs_from_logits(ppo.policy_logits(policy, batch, temperature=0.7), batch.response)  # (B, R)
        vals = ppo.value_predictions(value, batch)  # (B, R)
        for i, (q, r) in enumerate(zip(queries, responses, strict=True)):
            seq = torch.tensor([q + r])
            logits = policy(seq).logits[0] / 0.7  # (T, V)
            want = torch.log_softmax(logits[len(q) - 1: len(q) + len(r) - 1], -1).gather(
                -1, torch.tensor(r)[:, None])[:, 0]
            assert torch.allclose(lp[i, : len(r)], want, atol=1e-5)
            want_v = value(seq).logits[0, len(q) - 1: len(q) + len(r) - 1, 0]  # V(s_t) before token t
            assert torch.allclose(vals[i, : len(r)], want_v, atol=1e-5)


def test_engine_logprobs_match_a_forward_pass(tiny_ckpt):
    """HF generate's own logits give the rollout log-probs (ppo.rollout_logprobs=engine): 1e-4 from a forward pass."""
    from iterative_rlhf.checkpoint import load_causal_lm, load_tokenizer
    from iterative_rlhf.generation import HFEngine

    recipe = tiny_recipe()
    tok = load_tokenizer(str(tiny_ckpt))
    model = load_causal_lm(str(tiny_ckpt))
    engine = HFEngine(str(tiny_ckpt), recipe.generation, model=model, tokenizer=tok)
    prompts = ["Add 2 and 3.", "What is the capital of France?", "Add 1 and 1.", "Say the opposite of hot."] * 3
    batch, comps = ppo.rollout(engine, tok, prompts, temperature=0.7, max_new_tokens=6, seed=3, engine_logprobs=True)
    lp, have = ppo.engine_logprobs(comps, batch)
    assert have.sum() >= len(prompts) - 2  # only a sampled pad token (dropped from the ids) leaves a row without
    with torch.no_grad():
        want = logprobs_from_logits(ppo.policy_logits(model, batch, temperature=0.7), batch.response)  # (B, R)
    m = batch.response_mask.bool() & have[:, None]
    torch.testing.assert_close(lp[m], want[m], atol=1e-4, rtol=0)
    assert (lp[~batch.response_mask.bool()] == 0).all()
    # Same samples with or without the log-probs (the same seeds per generate batch).
    _, plain = ppo.rollout(engine, tok, prompts, temperature=0.7, max_new_tokens=6, seed=3)
    assert [c.token_ids for c in plain] == [c.token_ids for c in comps]
    assert all(c.logprobs is None for c in plain)

    # rollout_forward keeps the engine's rows and runs the policy only on the others.
    class M:
        accelerator = None
        reference = model

        def unwrapped_policy(self):  # noqa: ANN202
            return model

        def unwrapped_value(self):  # noqa: ANN202
            return model  # value_predictions reads logit 0 of every position: any model does here

        def reference_model(self):  # noqa: ANN202
            import contextlib

            return contextlib.nullcontext(model)

    have2 = have.clone()
    have2[0] = False
    lp2 = lp.clone()
    lp2[0] = 123.0  # ignored: row 0 is recomputed
    got, ref, _ = ppo.rollout_forward(M(), batch, 0.7, 5, lp2, have2)
    torch.testing.assert_close(got[0], want[0] * batch.response_mask[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[have2], lp[have2])
    torch.testing.assert_close(ref[m], want[m], atol=1e-4, rtol=0)  # reference = the same model here


def test_bf16_mixed_precision_forward_passes_stay_close_to_float32(tiny_ckpt):
    from types import SimpleNamespace

    from iterative_rlhf.checkpoint import load_causal_lm

    model = load_causal_lm(str(tiny_ckpt))
    batch = ppo.pad_rollouts([[1, 5, 6, 7], [1, 9]], [[10, 11], [12, 13, 14, 2]], pad_id=0)
    models = ppo.Models(policy=model, value=None, reference=None, tokenizer=None, policy_opt=None, value_opt=None,
                        accelerator=SimpleNamespace(device=torch.device("cpu")), mixed_precision="bf16")
    with torch.no_grad():
        want = logprobs_from_logits(ppo.policy_logits(model, batch), batch.response)
        with models.autocast():
            assert torch.is_autocast_enabled("cpu")
            got = logprobs_from_logits(ppo.policy_logits(model, batch), batch.response)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)
    models.mixed_precision = "none"
    with models.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_run_with_bf16_and_engine_logprobs_logs_the_phase_split(tiny_ckpt, tmp_path):
    prompts = [{"prompt": f"Add {i} and 1.", "is_safety": False} for i in range(8)]
    ppo.run_ppo(tiny_recipe("ppo.mixed_precision=bf16"), policy_path=str(tiny_ckpt), helpful_rm=str(tiny_ckpt),
                safety_rm=str(tiny_ckpt), out_dir=tmp_path / "run", prompts=prompts, eval_prompts=prompts[:3],
                scorer=JudgeScorer(), whiten=WhitenStats(0.0, 1.0))
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    last = rows[-1]
    assert last["iteration"] == 2 and math.isfinite(last["pg_loss"]) and math.isfinite(last["kl"])
    assert last["rollout_logprobs_from_engine"] > 0.5
    for k in ("cpu_generation", "cpu_scoring", "cpu_rollout_forward", "cpu_update", "peak_rss_mib"):
        assert last[k] >= 0
    assert last["cpu_seconds"] >= last["cpu_update"]


# --------------------------------------------------------------------------- 3-4. rewards and advantages


def test_token_rewards_and_advantages_from_compute_advantages():
    cfg = PPOConfig(kl_coef=0.1, gamma=1.0, lam=1.0)
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = ppo.compute_advantages(torch.tensor([1.0, -1.0]), logp, ref, torch.zeros(2, 3), mask, cfg)
    assert torch.allclose(adv.kl, torch.tensor([[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]]))
    assert torch.allclose(adv.rewards, torch.tensor([[-0.05, 1.0, 0.0], [0.05, 0.0, -1.0]]))
    # gamma = lam = 1 and V = 0: returns are the reward-to-go
    assert torch.allclose(adv.returns, torch.tensor([[0.95, 1.0, 0.0], [-0.95, -1.0, -1.0]]))
    assert float(adv.advantages[mask.bool()].mean().abs()) < 1e-6  # whitened over response tokens
    assert float(adv.advantages[0, 2]) == 0.0


def test_kl_penalty_with_zero_score_pulls_the_policy_toward_the_reference():
    """With score 0 the only reward is -beta * (log pi - log pi_ref): PPO steps must shrink KL(pi || ref)."""
    torch.manual_seed(0)
    V, T, B = 6, 4, 512
    ref_logits = torch.randn(T, V)
    theta = (ref_logits + 2.0 * torch.randn(T, V)).requires_grad_()  # a policy far from the reference
    opt = torch.optim.Adam([theta], lr=0.05)
    cfg = PPOConfig(kl_coef=0.2, gamma=1.0, lam=0.95)
    mask = torch.ones(B, T)

    @torch.no_grad()
    def kl() -> float:
        lp, lr = torch.log_softmax(theta, -1), torch.log_softmax(ref_logits, -1)
        return float((lp.exp() * (lp - lr)).sum())

    kl0 = kl()
    for _ in range(40):
        with torch.no_grad():
            tokens = torch.distributions.Categorical(logits=theta).sample((B,))  # (B, T)
            logp = torch.log_softmax(theta, -1)[torch.arange(T), tokens]  # (B, T)
            ref_lp = torch.log_softmax(ref_logits, -1)[torch.arange(T), tokens]  # (B, T)
        adv = ppo.compute_advantages(torch.zeros(B), logp, ref_lp, torch.zeros(B, T), mask, cfg)
        # tokens the policy over-weights against the reference get a lower advantage
        assert float(torch.corrcoef(torch.stack([adv.rewards.flatten(), (logp - ref_lp).flatten()]))[0, 1]) < -0.99
        new_lp = torch.log_softmax(theta, -1)[torch.arange(T), tokens]  # (B, T)
        loss, _ = policy_loss(new_lp, logp, adv.advantages, mask, clip=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert kl() < 0.3 * kl0


# --------------------------------------------------------------------------- models


def test_value_model_from_reward_model_keeps_its_score_head(tiny_ckpt, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rm = AutoModelForSequenceClassification.from_pretrained(str(tiny_ckpt), num_labels=1)
    torch.nn.init.normal_(rm.score.weight)
    rm.config.pad_token_id = 0
    rm.save_pretrained(tmp_path / "rm")
    recipe = tiny_recipe("ppo.value_init=reward")
    value = ppo.load_value_model(recipe, str(tiny_ckpt), str(tmp_path / "rm"), pad_token_id=0)
    assert torch.equal(value.score.weight, rm.score.weight) and value.score.bias is None
    # the value at the last token of a sequence is the RM's score of it
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.allclose(value(ids).logits[0, -1, 0], rm.eval()(ids).logits[0, 0], atol=1e-5)
    with pytest.raises(UserError, match="score"):
        ppo.load_value_model(recipe, str(tiny_ckpt), str(tiny_ckpt), pad_token_id=0)  # a policy is no RM
    fresh = ppo.load_value_model(tiny_recipe(), str(tiny_ckpt), str(tiny_ckpt), pad_token_id=0)
    assert float(fresh.score.weight.abs().sum()) == 0.0  # value_init=policy: V = 0 at the start


def test_lora_reference_is_the_policy_with_the_adapter_disabled(tiny_ckpt):
    from accelerate import Accelerator

    from iterative_rlhf.checkpoint import load_causal_lm

    recipe = tiny_recipe("ppo.lora.enabled=true")
    models = ppo.load_models(recipe, str(tiny_ckpt), str(tiny_ckpt), Accelerator(cpu=True))
    assert models.reference is None
    with torch.no_grad():
        for n, p in models.unwrapped_policy().named_parameters():
            if "lora_B" in n:
                p.add_(0.5)  # move the adapter away from its zero start
    batch = ppo.pad_rollouts([[1, 5, 6]], [[7, 8]], pad_id=0)
    base = load_causal_lm(str(tiny_ckpt))
    with torch.no_grad():
        want = ppo.policy_logits(base, batch)
        with models.reference_model() as ref:
            got = ppo.policy_logits(ref, batch)
        live = ppo.policy_logits(models.unwrapped_policy(), batch)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(live, want, atol=1e-3)
    weights = ppo.policy_weights_for_inference(models.unwrapped_policy())  # merged, HF names
    assert set(weights) == set(base.state_dict())
    assert hasattr(models.unwrapped_policy(), "disable_adapter")  # the merge was undone


# --------------------------------------------------------------------------- 5. update: micro-batches, checkpointing


@pytest.fixture(scope="module")
def world_rollouts(world):
    """32 rollouts of the tests' TinyWorld policy (train prompts, 24 new tokens at temperature 1) and scores."""
    from iterative_rlhf.checkpoint import load_causal_lm, load_tokenizer
    from iterative_rlhf.generation import HFEngine

    recipe = load_recipe(None, overrides=["generation.max_new_tokens=24"])
    tok = load_tokenizer(str(world.policy))
    engine = HFEngine(str(world.policy), recipe.generation, model=load_causal_lm(str(world.policy)), tokenizer=tok)
    prompts = [r["prompt"] for r in read_jsonl(world.prompts("train"))[:32]]
    batch, _ = ppo.rollout(engine, tok, prompts, temperature=1.0, max_new_tokens=24, seed=5)
    lengths = batch.response_mask.sum(1)
    assert lengths.min() < lengths.max()  # responses of different lengths: micro-batches hold unequal token counts
    return batch, torch.randn(len(prompts), generator=torch.Generator().manual_seed(0))


def _trainable(models: ppo.Models) -> dict[str, torch.Tensor]:
    return {f"{name}.{n}": p.detach().clone() for name, m in (("policy", models.unwrapped_policy()),
                                                              ("value", models.unwrapped_value()))
            for n, p in m.named_parameters() if p.requires_grad}


def _one_update(world, batch, scores, *overrides: str) -> tuple[dict, dict, dict, ppo.Models]:  # noqa: ANN001
    """Fresh models (same seed), one PPO epoch of 2 mini-batches of 16: metrics, weights before and after, models."""
    from accelerate import Accelerator

    recipe = load_recipe(None, overrides=["ppo.batch_size=32", "ppo.mini_batch_size=16", "ppo.ppo_epochs=1",
                                          "ppo.value_init=policy", "ppo.learning_rate=0.001",
                                          "ppo.value_learning_rate=0.001", *overrides])
    torch.manual_seed(0)  # LoRA's A matrices
    models = ppo.load_models(recipe, str(world.policy), str(world.policy), Accelerator(cpu=True))
    with torch.no_grad():  # a non-zero value head, so the value backbone gets gradients too
        head = [p for n, p in models.unwrapped_value().named_parameters() if "score" in n and p.requires_grad][0]
        head.copy_(0.1 * torch.randn(head.shape, generator=torch.Generator().manual_seed(1)))
    before = _trainable(models)
    logprobs, ref_logprobs, values = ppo.rollout_forward(models, batch, 1.0, 32)
    adv = ppo.compute_advantages(scores, logprobs, ref_logprobs, values, batch.response_mask, recipe.ppo)
    metrics = ppo.ppo_update(models, batch, logprobs, values, adv, recipe.ppo, mini_batch_size=16,
                             generator=torch.Generator().manual_seed(2), iteration=1)
    return metrics, before, _trainable(models), models


def _assert_same_update(a: tuple, b: tuple) -> None:
    (ma, start, wa, _), (mb, start_b, wb, _) = a, b
    assert all(torch.equal(start[k], start_b[k]) for k in start)  # the same initial weights
    assert wa.keys() == wb.keys() == start.keys()
    moved = max(float((wa[k] - start[k]).abs().max()) for k in wa)
    diff = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert moved > 1e-3 and diff < 1e-5, (moved, diff)  # the step is ~1e-3 per weight; the two agree to 1e-5
    assert ma.keys() == mb.keys()
    for k in ma:
        assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-6), k


def test_micro_batches_and_gradient_checkpointing_give_the_full_mini_batch_update(world, world_rollouts):
    """Micro-batches of mini/4 (token-weighted losses) and per-layer checkpointing: the same weights and metrics."""
    batch, scores = world_rollouts
    whole = _one_update(world, batch, scores)
    micro = _one_update(world, batch, scores, "ppo.micro_batch_size=4")
    _assert_same_update(whole, micro)
    ckpt = _one_update(world, batch, scores, "ppo.micro_batch_size=4", "ppo.gradient_checkpointing=true")
    assert ckpt[3].unwrapped_policy().model.gradient_checkpointing
    assert ckpt[3].unwrapped_value().model.gradient_checkpointing
    _assert_same_update(whole, ckpt)


def test_lora_with_gradient_checkpointing_and_micro_batches_gives_the_same_update(world, world_rollouts):
    """peft models: frozen embeddings, so checkpointing needs inputs that require grad; the update is unchanged."""
    batch, scores = world_rollouts
    lora = ("ppo.lora.enabled=true", "ppo.lora.dropout=0.0")
    whole = _one_update(world, batch, scores, *lora)
    ckpt = _one_update(world, batch, scores, *lora, "ppo.micro_batch_size=4", "ppo.gradient_checkpointing=true")
    base = ckpt[3].unwrapped_policy().get_base_model()
    assert base.model.gradient_checkpointing and base._require_grads_hooks
    _assert_same_update(whole, ckpt)
    # checkpointing keeps fewer activations: bytes saved for the backward of one training forward pass
    sub = batch.select(torch.arange(8))

    def saved_bytes(model) -> int:  # noqa: ANN001
        seen: dict[int, int] = {}
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ppo.value_predictions(model.train(), sub)
        return sum(seen.values())

    assert saved_bytes(ckpt[3].unwrapped_value()) < 0.7 * saved_bytes(whole[3].unwrapped_value())


def test_ppo_samples_with_hf_when_vllm_cannot_take_a_quantised_policy(tiny_ckpt, capsys):
    """generation.engine=vllm with QLoRA: PPO falls back to HF generate and says why (no vLLM start)."""
    from accelerate import Accelerator

    from iterative_rlhf.generation import HFEngine

    models = ppo.load_models(tiny_recipe(), str(tiny_ckpt), str(tiny_ckpt), Accelerator(cpu=True))
    recipe = tiny_recipe("generation.engine=vllm", "ppo.lora.enabled=true", "ppo.quant.load_in_4bit=true")
    engine = ppo._make_engine(recipe, models, str(tiny_ckpt), seed=0)
    assert isinstance(engine, HFEngine) and engine.model is models.unwrapped_policy()
    out = " ".join(capsys.readouterr().err.split())  # the console writes to stderr
    assert "sampling with HF generate, not vLLM" in out and "quantised" in out


def test_micro_batch_size_larger_than_the_mini_batch_is_refused():
    from iterative_rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match="micro_batch_size"):
        load_recipe(None, overrides=["ppo.mini_batch_size=16", "ppo.micro_batch_size=32"])


def test_nan_reward_raises_numerical_error_naming_the_iteration(tiny_ckpt, tmp_path):
    prompts = [{"prompt": f"Add {i} and 1.", "is_safety": False} for i in range(8)]
    with pytest.raises(NumericalError, match="iteration 1"):
        ppo.run_ppo(tiny_recipe(), policy_path=str(tiny_ckpt), helpful_rm=str(tiny_ckpt), safety_rm=str(tiny_ckpt),
                    out_dir=tmp_path / "run", prompts=prompts, eval_prompts=prompts[:3], scorer=NaNScorer(),
                    whiten=WhitenStats(0.0, 1.0))


def test_safety_weight_draws_safety_prompts_more_often(tiny_ckpt, tmp_path):
    # 2 safety prompts of 8: drawn 2 in 8 times by default, 8 in 14 with ppo.safety_weight=4 (28 draws each)
    prompts = [{"prompt": f"Add {i} and 1.", "is_safety": i < 2} for i in range(8)]
    shares = {}
    for w in (1, 4):
        out = tmp_path / f"w{w}"
        ppo.run_ppo(tiny_recipe("ppo.iterations=7", "ppo.eval_every=7", f"ppo.safety_weight={w}"),
                    policy_path=str(tiny_ckpt), helpful_rm=str(tiny_ckpt), safety_rm=str(tiny_ckpt), out_dir=out,
                    prompts=prompts, eval_prompts=prompts[:2], scorer=JudgeScorer(), whiten=WhitenStats(0.0, 1.0))
        rows = [r for r in read_jsonl(out / "metrics.jsonl") if "safety_share" in r]
        assert len(rows) == 7
        shares[w] = sum(r["safety_share"] for r in rows) / len(rows)
    assert 6 / 28 <= shares[1] <= 8 / 28  # 3 passes over the 8 prompts, then 4 of the next
    assert shares[4] == pytest.approx(8 / 14)  # exactly 2 passes over the 14 weighted rows


# --------------------------------------------------------------------------- the loop on TinyWorld (slow)


def _world_prompts(world) -> tuple[list[dict], list[dict]]:  # noqa: ANN001
    return read_jsonl(world.prompts("train")), read_jsonl(world.prompts("eval"))


JUDGE_SETTINGS = ["ppo.batch_size=64", "ppo.mini_batch_size=16", "ppo.ppo_epochs=2", "ppo.learning_rate=0.0003",
                  "ppo.value_learning_rate=0.001", "ppo.kl_coef=0.02", "ppo.value_init=policy",
                  "ppo.eval_every=4", "generation.max_new_tokens=24", "generation.batch_size=64"]


@pytest.mark.slow
def test_ppo_raises_gold_judge_reward_on_tinyworld(world, tmp_path):
    train, evalp = _world_prompts(world)
    recipe = load_recipe(None, overrides=[*JUDGE_SETTINGS, "ppo.iterations=8", "ppo.save_every=4"])
    out = ppo.run_ppo(recipe, policy_path=str(world.policy), helpful_rm="-", safety_rm="-",
                      out_dir=tmp_path / "ppo", prompts=train, eval_prompts=evalp[:64], scorer=JudgeScorer(),
                      eval_metrics=tinyworld_metrics, seed=0)
    rows = read_jsonl(tmp_path / "ppo" / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == list(range(9))
    for r in rows:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
    its = rows[1:]
    first, last = sum(r["reward"] for r in its[:3]) / 3, sum(r["reward"] for r in its[-3:]) / 3
    assert last > first + 0.1, [r["reward"] for r in its]
    assert rows[-1]["eval_gold"] > rows[0]["eval_gold"]  # held-out gold (TinyWorld's truth) rises too
    assert all(r["kl"] < 10.0 for r in its)
    _assert_loadable(out)


def _assert_loadable(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and not any("lora" in k for k in model.state_dict())
    ids = tok.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]


@pytest.mark.slow
def test_resumed_run_ends_like_an_uninterrupted_one(world, tmp_path):
    train, evalp = _world_prompts(world)
    recipe = load_recipe(None, overrides=[*JUDGE_SETTINGS, "ppo.iterations=4", "ppo.save_every=2",
                                          "ppo.eval_every=2", "ppo.batch_size=16", "ppo.mini_batch_size=8"])
    kw = dict(policy_path=str(world.policy), helpful_rm="-", safety_rm="-", prompts=train, eval_prompts=evalp[:24],
              eval_metrics=tinyworld_metrics, seed=1)
    ppo.run_ppo(recipe, out_dir=tmp_path / "full", scorer=JudgeScorer(), **kw)
    with pytest.raises(RuntimeError, match="simulated crash"):  # dies in iteration 3, after the state of 2
        ppo.run_ppo(recipe, out_dir=tmp_path / "resumed", scorer=CrashingScorer(16, crash_on=3), **kw)
    assert json.loads((tmp_path / "resumed" / "state" / "trainer_state.json").read_text())["iteration"] == 2
    ppo.run_ppo(recipe, out_dir=tmp_path / "resumed", scorer=JudgeScorer(), **kw)

    def clean(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith(("time", "cpu"))} for r in rows]

    assert clean(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == \
        clean(read_jsonl(tmp_path / "resumed" / "metrics.jsonl"))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "policy" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "policy" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _probe_reward_model(policy: Path, comparisons: Path, out: Path, steps: int = 300) -> Path:
    """A reward model made cheaply: the policy's backbone, frozen, with a score head fitted on comparisons.

    The head is a logistic regression on last-token hidden-state differences
    (the Bradley-Terry loss), enough for an end-to-end test of the scorer path.
    """
    from transformers import AutoModelForSequenceClassification

    from iterative_rlhf.checkpoint import load_tokenizer
    from iterative_rlhf.scorer import encode

    tok = load_tokenizer(str(policy))
    rm = AutoModelForSequenceClassification.from_pretrained(str(policy), num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rows = read_jsonl(comparisons)[:600]

    @torch.no_grad()
    def last_hidden(texts: list[tuple[str, str]]) -> torch.Tensor:
        ids = [encode(tok, p, r) for p, r in texts]
        T = max(len(x) for x in ids)
        batch = torch.full((len(ids), T), tok.pad_token_id)  # (N, T) right padded
        attn = torch.zeros((len(ids), T), dtype=torch.long)
        for i, x in enumerate(ids):
            batch[i, : len(x)], attn[i, : len(x)] = torch.tensor(x), 1
        hidden = rm.model(input_ids=batch, attention_mask=attn).last_hidden_state  # (N, T, H)
        return hidden[torch.arange(len(ids)), attn.sum(1) - 1]  # (N, H) at the last token

    diff = last_hidden([(r["prompt"], r["chosen"]) for r in rows]) - \
        last_hidden([(r["prompt"], r["rejected"]) for r in rows])  # (N, H)
    w = torch.zeros(diff.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    for _ in range(steps):
        loss = -torch.nn.functional.logsigmoid(diff @ w).mean() + 1e-3 * (w**2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        rm.score.weight.copy_(w[None])
    rm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow
def test_end_to_end_lora_with_the_gated_scorer_and_a_reward_model_value_head(world, tmp_path):
    helpful = _probe_reward_model(world.policy, world.comparisons("helpful", "train"), tmp_path / "rm_h")
    safety = _probe_reward_model(world.policy, world.comparisons("safety", "train"), tmp_path / "rm_s")
    train, evalp = _world_prompts(world)
    recipe = load_recipe(None, overrides=[*JUDGE_SETTINGS, "ppo.value_init=reward", "ppo.iterations=4",
                                          "ppo.eval_every=2", "ppo.lora.enabled=true", "ppo.learning_rate=0.003"])
    out = ppo.run_ppo(recipe, policy_path=str(world.policy), helpful_rm=str(helpful), safety_rm=str(safety),
                      out_dir=tmp_path / "ppo", prompts=train, eval_prompts=evalp[:32], seed=0)
    rows = read_jsonl(tmp_path / "ppo" / "metrics.jsonl")
    assert len(rows) == 5 and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    whiten = json.loads((tmp_path / "ppo" / "whiten.json").read_text())
    assert whiten["std"] > 0
    # the fitted statistics whiten the starting policy's rewards: iteration 1 is near mean 0
    assert abs(rows[1]["reward"]) < 1.0
    # (that the reward rises is checked with the exact gold reward above; these probe RMs are too weak for 4 steps)
    summary = json.loads((tmp_path / "ppo" / "summary.json").read_text())
    assert summary["best_eval_reward"] == max(r["eval_reward"] for r in rows if "eval_reward" in r)
    _assert_loadable(out)


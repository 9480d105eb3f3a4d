"""The gated scorer on two tiny random reward models (no training): gate, order, whitening, kinds, files."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from iterative_rlhf.config import ScorerConfig, load_recipe
from iterative_rlhf.errors import DataError
from iterative_rlhf.rlmath import WhitenStats, gate, logit
from iterative_rlhf.scorer import GatedScorer, RewardModelScorer, encode, encode_all, resolve_is_safety, score_file
from iterative_rlhf.tinyworld.world import get_prompts

PROMPTS = ["What is 2 plus 3?", "What is the capital of France?", "How do I build a bomb?", "Say the opposite of hot."]
RESPONSES = ["5", "Paris is the capital of France, a country in Europe.", "I cannot help with that.",
             "cold cold cold cold cold cold cold cold cold cold cold"]


def _tiny_rm(tok, path, seed: int, scale: float) -> None:
    """A 1-layer random LlamaForSequenceClassification; ``scale`` spreads its scores over a wide range."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128, num_labels=1,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForSequenceClassification(cfg)
    with torch.no_grad():
        model.score.weight.mul_(scale)
    model.save_pretrained(path)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def rms(tmp_path_factory):
    from iterative_rlhf.tinyworld.policy import build_tokenizer

    root = tmp_path_factory.mktemp("rms")
    tok = build_tokenizer([p.text for p in get_prompts()] + RESPONSES, 300)
    _tiny_rm(tok, root / "helpful", seed=1, scale=20.0)
    _tiny_rm(tok, root / "safety", seed=2, scale=60.0)
    return root / "helpful", root / "safety"


def _data(n: int = 24):
    prompts = [PROMPTS[i % 4] for i in range(n)]
    responses = [RESPONSES[(i * 3) % 4] + " " + "word " * (i % 7) for i in range(n)]
    is_safety = [i % 5 == 0 for i in range(n)]
    return prompts, responses, is_safety


def test_gate_matches_rlmath_by_hand(rms):
    prompts, responses, is_safety = _data()
    with GatedScorer(*rms, ScorerConfig(batch_size=5)) as scorer:
        # A threshold in the middle of these random scores, so that both branches of the gate happen.
        thr = float(torch.sigmoid(scorer.score(prompts, responses, is_safety).safety).median())
        scorer.cfg = replace(scorer.cfg, threshold=thr)
        b = scorer.score(prompts, responses, is_safety)
    p_h, p_s = torch.sigmoid(b.helpful.double()), torch.sigmoid(b.safety.double())
    r_c, used = gate(p_h, p_s, torch.tensor(is_safety), thr)
    assert torch.equal(b.used_safety, used)
    torch.testing.assert_close(b.r_c, r_c.float())
    torch.testing.assert_close(b.reward, logit(r_c).float())
    assert not b.whitened
    # Both branches of the gate happen on these inputs, and the safety tag wins whatever R_s is.
    below = p_s < thr
    assert (used & ~torch.tensor(is_safety) & below).any() and (~used).any()
    assert used[torch.tensor(is_safety)].all()
    rows = b.rows()
    assert len(rows) == len(b) == len(prompts)
    assert set(rows[0]) == {"score_helpful", "score_safety", "p_helpful", "p_safety", "used_safety", "r_c", "reward"}
    assert rows[3]["used_safety"] == bool(used[3])


def test_length_sorting_restores_input_order(rms):
    prompts, responses, _ = _data(11)
    batched = RewardModelScorer(rms[0], batch_size=3)
    one = RewardModelScorer(rms[0], batch_size=1)
    s = batched.score(prompts, responses)
    ref = torch.stack([one.score([p], [r])[0] for p, r in zip(prompts, responses, strict=True)])
    torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-5)
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(0)).tolist()
    s_perm = batched.score([prompts[i] for i in perm], [responses[i] for i in perm])
    torch.testing.assert_close(s_perm, s[torch.tensor(perm)], rtol=1e-5, atol=1e-5)
    assert len({len(encode(batched.tokenizer, p, r)) for p, r in zip(prompts, responses, strict=True)}) > 3


def test_reward_only_scoring_skips_the_helpfulness_rm_where_the_gate_picks_safety(rms):
    prompts, responses, is_safety = _data()
    with GatedScorer(*rms, ScorerConfig(batch_size=5)) as scorer:
        thr = float(torch.sigmoid(scorer.score(prompts, responses, is_safety).safety).median())
        scorer.cfg = replace(scorer.cfg, threshold=thr)
        full = scorer.score(prompts, responses, is_safety)
        calls = []
        score = scorer.helpful_rm.score
        scorer.helpful_rm.score = lambda p, r, d=None: calls.append(len(p)) or score(p, r, d)
        lean = scorer.score(prompts, responses, is_safety, raw=False)
    assert torch.equal(lean.used_safety, full.used_safety)
    torch.testing.assert_close(lean.reward, full.reward)
    torch.testing.assert_close(lean.safety, full.safety)
    skipped = full.used_safety
    assert skipped.any() and (~skipped).any()
    assert calls == [int((~skipped).sum())]  # the helpfulness RM saw only the rows the gate sends to it
    assert lean.helpful[skipped].isnan().all()
    torch.testing.assert_close(lean.helpful[~skipped], full.helpful[~skipped])


def test_encode_all_templates_each_pair_once_with_the_same_ids(rms):
    tok = RewardModelScorer(rms[0]).tokenizer
    prompts, responses, _ = _data(12)
    prompts, responses = prompts * 2, responses * 2  # every pair twice
    cache: dict = {}
    ids = encode_all(tok, prompts, responses, cache)
    assert ids == [encode(tok, p, r) for p, r in zip(prompts, responses, strict=True)]
    assert len(cache) == len(set(zip(prompts, responses, strict=True))) < len(prompts)
    ids[0].append(-1)  # each row owns its list: changing one leaves the cache and the other rows alone
    assert encode_all(tok, prompts[:1], responses[:1], cache)[0] == encode(tok, prompts[0], responses[0])


def test_length_buckets_bound_padding():
    from iterative_rlhf.scorer import length_buckets

    lengths = [60] * 3 + [55] * 10 + [40] * 20 + [39] * 5
    out = length_buckets(lengths, batch_size=16, min_rows=8)
    assert sum(out, []) == list(range(len(lengths)))  # every item once, in order
    assert all(len(b) <= 16 for b in out)
    for b in out:
        top = lengths[b[0]]
        assert len(b) < 8 or all(lengths[i] >= 0.9 * top for i in b[8:])
    assert [len(b) for b in out] == [13, 16, 9]  # 60/55 together (>= 8 rows before the cut), then 40s and 39s


def test_whitening_fit_and_apply(rms):
    prompts, responses, is_safety = _data()
    with GatedScorer(*rms, ScorerConfig(threshold=0.4)) as scorer:
        raw = scorer.score(prompts, responses, is_safety)
        stats = scorer.fit_whitening(prompts, responses, is_safety)
        white = scorer.score(prompts, responses, is_safety)
    expected = WhitenStats.fit(logit(raw.r_c.double()))
    assert stats.mean == pytest.approx(expected.mean, rel=1e-5, abs=1e-5)
    assert stats.std == pytest.approx(expected.std, rel=1e-5)
    assert white.whitened
    assert float(white.reward.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(white.reward.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    torch.testing.assert_close(white.reward, stats.apply(raw.reward), rtol=1e-5, atol=1e-5)
    # Fixed statistics: a new batch is whitened with the round's stats, not its own.
    with GatedScorer(*rms, ScorerConfig(threshold=0.4), whiten=WhitenStats(mean=1.0, std=2.0)) as scorer:
        fixed = scorer.score(prompts[:3], responses[:3], is_safety[:3])
    torch.testing.assert_close(fixed.reward, (raw.reward[:3] - 1.0) / 2.0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["helpful", "safety"])
def test_scorer_kinds_use_one_rm_everywhere(rms, kind):
    prompts, responses, is_safety = _data(12)
    with GatedScorer(*rms, ScorerConfig(kind=kind, threshold=0.4)) as scorer:
        b = scorer.score(prompts, responses, is_safety)
    p = b.p_helpful if kind == "helpful" else b.p_safety
    torch.testing.assert_close(b.r_c, p)
    torch.testing.assert_close(b.reward, logit(p.double()).float())
    assert b.used_safety.all() if kind == "safety" else not b.used_safety.any()


def test_score_file_columns_and_is_safety(rms, tmp_path):
    harmful = next(p for p in get_prompts() if p.family == "harmful")
    safe = next(p for p in get_prompts() if p.family == "add")
    rows = [{"prompt": harmful.text, "response": "I cannot help with that."},
            {"prompt": safe.text, "response": "7", "id": 5},
            {"prompt": "not a TinyWorld prompt", "response": "ok"},
            {"prompt": safe.text, "response": "7", "is_safety": True}]
    assert [resolve_is_safety(r) for r in rows] == [True, False, False, True]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe(None, overrides=["scorer.threshold=0.4"])
    summary = score_file(recipe, src, out, *rms)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["rows"] == len(got) == 4
    for row in got:
        for col in ("score_helpful", "score_safety", "p_helpful", "p_safety", "used_safety", "r_c", "reward"):
            assert col in row
    assert got[1]["id"] == 5 and got[0]["used_safety"] and got[3]["used_safety"]
    # The gate decision in the file is the gate applied to the file's own scores.
    for row, flag in zip(got, [True, False, False, True], strict=True):
        assert row["used_safety"] == (flag or row["p_safety"] < 0.4)


def test_score_file_missing_column_names_row_and_field(rms, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, row 2, field 'response'"):
        score_file(load_recipe(None), src, tmp_path / "out.jsonl", *rms)
    src.write_text(json.dumps({"prompt": "a", "response": "b", "is_safety": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"row 1, field 'is_safety'"):
        score_file(load_recipe(None), src, tmp_path / "out.jsonl", *rms)


def test_score_batch_rows_roundtrip():
    t = torch.tensor([0.5, -1.0])
    from iterative_rlhf.scorer import ScoreBatch

    b = ScoreBatch(helpful=t, safety=-t, p_helpful=torch.sigmoid(t), p_safety=torch.sigmoid(-t),
                   used_safety=torch.tensor([True, False]), r_c=torch.sigmoid(t), reward=t)
    rows = b.rows()
    assert rows[1]["score_safety"] == pytest.approx(1.0) and rows[0]["used_safety"] is True
    assert replace(b, whitened=True).whitened

"""Unit tests for iterative_rlhf.rlmath against small hand-computed tensors."""

from __future__ import annotations

import math

import pytest
import torch

from iterative_rlhf import rlmath as rm


def nls(z: float) -> float:
    """-log(sigmoid(z)) written out by hand."""
    return -math.log(1.0 / (1.0 + math.exp(-z)))


def close(a, b, tol: float = 1e-6) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=0)


# ---------------------------------------------------------------- margins / ranking loss

def test_margin_tables():
    assert rm.LEVELS == ("significantly_better", "better", "slightly_better", "negligibly_better")
    assert [rm.MARGINS["none"][lv] for lv in rm.LEVELS] == [0.0, 0.0, 0.0, 0.0]
    assert [rm.MARGINS["small"][lv] for lv in rm.LEVELS] == [1.0, 2 / 3, 1 / 3, 0.0]
    assert [rm.MARGINS["large"][lv] for lv in rm.LEVELS] == [3.0, 2.0, 1.0, 0.0]


# chosen score 2, rejected score 1: loss = -log(sigmoid(1 - m))
@pytest.mark.parametrize("scheme,level,expected", [
    ("none", "significantly_better", nls(1.0)),
    ("none", "better", nls(1.0)),
    ("none", "slightly_better", nls(1.0)),
    ("none", "negligibly_better", nls(1.0)),
    ("small", "significantly_better", math.log(2.0)),  # -log(sigmoid(0))
    ("small", "better", nls(1.0 - 2.0 / 3.0)),
    ("small", "slightly_better", nls(1.0 - 1.0 / 3.0)),
    ("small", "negligibly_better", nls(1.0)),
    ("large", "significantly_better", nls(-2.0)),
    ("large", "better", nls(-1.0)),
    ("large", "slightly_better", math.log(2.0)),
    ("large", "negligibly_better", nls(1.0)),
])
def test_margin_ranking_loss_per_scheme_and_level(scheme, level, expected):
    m = rm.margin_for(level, scheme)
    loss, diag = rm.margin_ranking_loss(torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([m]))
    assert close(loss, expected)
    # float margin gives the same loss
    loss_f, _ = rm.margin_ranking_loss(torch.tensor([2.0]), torch.tensor([1.0]), m)
    assert close(loss_f, expected)
    assert float(diag["accuracy"]) == 1.0
    assert close(diag["score_margin"], 1.0)


def test_margin_ranking_loss_batch_and_no_margin():
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([1.0, 1.0])
    loss, diag = rm.margin_ranking_loss(chosen, rejected, rm.margins_for(["better", None], "large"))
    assert close(loss, (nls(1.0 - 2.0) + nls(-1.0)) / 2)
    assert close(diag["accuracy"], 0.5)
    assert close(diag["score_margin"], 0.0)
    loss0, _ = rm.margin_ranking_loss(chosen, rejected)
    assert close(loss0, (nls(1.0) + nls(-1.0)) / 2)


def test_margin_ranking_loss_gradient_direction():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    loss, _ = rm.margin_ranking_loss(chosen, rejected, 1.0)
    loss.backward()
    # d/dr_c of -log(sigmoid(r_c - r_r - 1)) at 0 = -(1 - sigmoid(-1))
    assert close(chosen.grad, [-(1 - 1 / (1 + math.e))])
    assert close(rejected.grad, [1 - 1 / (1 + math.e)])


def test_margin_for_none_and_errors():
    assert rm.margin_for(None, "large") == 0.0
    assert rm.margin_for("better", "small") == 2 / 3
    with pytest.raises(ValueError, match="large"):
        rm.margin_for("better", "huge")
    with pytest.raises(ValueError, match="small"):
        rm.margin_for(None, "bogus")
    with pytest.raises(ValueError, match="significantly_better"):
        rm.margin_for("amazing", "small")
    margins = rm.margins_for(["significantly_better", "negligibly_better", None], "large")
    assert margins.tolist() == [3.0, 0.0, 0.0]


# ---------------------------------------------------------------- gate / logit / whiten

def test_gate_threshold_boundary_and_safety_override():
    r_h = torch.tensor([0.9, 0.9, 0.9, 0.9])
    r_s = torch.tensor([0.15, 0.1499, 0.5, 0.05])
    is_safety = torch.tensor([False, False, True, False])
    r_c, used = rm.gate(r_h, r_s, is_safety)
    assert used.tolist() == [False, True, True, True]  # 0.15 is not < 0.15
    assert close(r_c, [0.9, 0.1499, 0.5, 0.05])
    assert used.dtype == torch.bool
    # float64 inputs and an explicit threshold
    r_h2 = torch.tensor([0.9, 0.9], dtype=torch.float64)
    r_s2 = torch.tensor([0.3, 0.29], dtype=torch.float64)
    r_c2, used2 = rm.gate(r_h2, r_s2, torch.tensor([False, False]), threshold=0.3)
    assert used2.tolist() == [False, True]
    assert close(r_c2, [0.9, 0.29])


def test_logit_roundtrip_and_clamping():
    p = torch.tensor([0.1, 0.5, 0.75, 0.9], dtype=torch.float64)
    z = rm.logit(p)
    assert close(z, [math.log(0.1 / 0.9), 0.0, math.log(3.0), math.log(9.0)], 1e-9)
    assert close(torch.sigmoid(z), p, 1e-12)
    edge = rm.logit(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.isfinite(edge).all()
    bound = math.log((1 - 1e-6) / 1e-6)
    assert close(edge, [-bound, bound], 1e-6)
    assert torch.isfinite(rm.logit(torch.tensor([0.0, 1.0]))).all()  # float32 too


def test_whiten_hand_values():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert close(rm.whiten(x, 1.0, 2.0), [0.0, 0.5, 1.0, 1.5])
    stats = rm.WhitenStats.fit(x)
    assert stats.mean == 2.5
    assert close(stats.std, math.sqrt(1.25), 1e-12)  # population std
    assert close(stats.apply(x), [v / math.sqrt(1.25) for v in (-1.5, -0.5, 0.5, 1.5)])
    assert close(rm.whiten(x, torch.tensor(2.5), torch.tensor(math.sqrt(1.25))), stats.apply(x))


def test_whiten_zero_variance_no_nan():
    x = torch.tensor([0.1, 0.1, 0.1])
    stats = rm.WhitenStats.fit(x)
    assert stats.std == 1e-8
    out = stats.apply(x)
    assert torch.equal(out, torch.zeros(3))
    assert torch.equal(rm.whiten(x, 0.1, 0.0), torch.zeros(3))
    assert torch.isfinite(rm.whiten(torch.tensor([1.0, 2.0]), 1.0, 0.0)).all()
    assert rm.WhitenStats.fit(torch.tensor([5.0])).std == 1e-8
    with pytest.raises(ValueError):
        rm.WhitenStats.fit(torch.tensor([]))


# ---------------------------------------------------------------- masked reductions

X = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 0.0, 0.0, 0.0]])
M = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])


def test_masked_mean_sum_var_hand_values():
    # selected values 1, 2, 3, 4
    assert float(rm.masked_sum(X, M)) == 10.0
    assert float(rm.masked_mean(X, M)) == 2.5
    assert rm.masked_mean(X, M, dim=1).tolist() == [2.0, 4.0]
    assert rm.masked_sum(X, M, dim=0).tolist() == [5.0, 2.0, 3.0, 0.0]
    assert close(rm.masked_var(X, M, unbiased=False), 1.25)
    assert close(rm.masked_var(X, M), 5.0 / 3.0)
    # bool mask and NaN under padding do not change anything
    xn = X.clone()
    xn[0, 3] = float("nan")
    assert float(rm.masked_mean(xn, M.bool())) == 2.5
    assert close(rm.masked_var(xn, M.bool()), 5.0 / 3.0)


def test_masked_all_zero_mask():
    zero = torch.zeros_like(M)
    assert float(rm.masked_mean(X, zero)) == 0.0
    assert float(rm.masked_var(X, zero)) == 0.0
    assert rm.masked_mean(X, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), dim=1).tolist() == [1.0, 0.0]
    one = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0]])
    assert float(rm.masked_var(X, one)) == 0.0  # single token: no inf from n/(n-1)


def test_masked_whiten():
    w = rm.masked_whiten(X, M)
    s = math.sqrt(5.0 / 3.0 + 1e-8)
    assert close(w, [[-1.5 / s, -0.5 / s, 0.5 / s, 0.0], [1.5 / s, 0.0, 0.0, 0.0]], 1e-5)
    w2 = rm.masked_whiten(X, M, shift_mean=False)
    expected = [[-1.5 / s + 2.5, -0.5 / s + 2.5, 0.5 / s + 2.5, 0.0], [1.5 / s + 2.5, 0.0, 0.0, 0.0]]
    assert close(w2, expected, 1e-5)


# ---------------------------------------------------------------- KL estimators

def test_kl_estimators_hand_values():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-2.0, -1.0]])
    assert rm.kl_k1(logp, ref).tolist() == [[1.0, -1.0]]
    assert rm.kl_k2(logp, ref).tolist() == [[0.5, 0.5]]
    # log r = ref - logp = [-1, 1]; k3 = (r - 1) - log r
    assert close(rm.kl_k3(logp, ref), [[math.exp(-1.0), math.e - 2.0]])
    assert torch.equal(rm.kl_penalty(logp, ref), rm.kl_k1(logp, ref))
    assert torch.equal(rm.kl_penalty(logp, ref, "k3"), rm.kl_k3(logp, ref))
    assert torch.equal(rm.kl_penalty(logp, ref, "k2"), rm.kl_k2(logp, ref))
    assert float(rm.kl_k3(logp, logp).abs().max()) == 0.0
    with pytest.raises(ValueError, match="k1"):
        rm.kl_penalty(logp, ref, "k4")


# ---------------------------------------------------------------- token rewards

def test_token_rewards_right_padding():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0], [-0.5, -0.5, -9.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, -7.0], [-1.0, -0.5, 0.0, 0.0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = rm.token_rewards(scores, logp, ref, mask, beta=0.1)
    assert close(kl, [[0.5, 0.0, -0.5, 0.0], [0.5, 0.0, 0.0, 0.0]])
    assert close(rewards, [[-0.05, 0.0, 0.05 + 2.0, 0.0], [-0.05, -1.0, 0.0, 0.0]])


def test_token_rewards_left_padding_and_empty_row():
    mask = torch.tensor([[0, 1, 1], [0, 0, 0], [1, 1, 1]])
    zeros = torch.zeros(3, 3)
    rewards, _ = rm.token_rewards(torch.tensor([1.0, 5.0, 3.0]), zeros, zeros, mask, beta=0.1)
    assert rewards.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 3.0]]
    assert rm.last_token_index(mask).tolist() == [2, 0, 2]
    assert rm.last_token_index(torch.tensor([[1, 1, 0, 0]])).tolist() == [1]


# ---------------------------------------------------------------- GAE

def test_gae_three_step_hand_example():
    # gamma=0.9, lam=0.5; terminal after the 3rd token
    # delta2 = 1 - 0.7 = 0.3; delta1 = 0.9*0.7 - 0.6 = 0.03; delta0 = 0.9*0.6 - 0.5 = 0.04
    # A2 = 0.3; A1 = 0.03 + 0.45*0.3 = 0.165; A0 = 0.04 + 0.45*0.165 = 0.11425
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.6, 0.7]])
    mask = torch.ones(1, 3)
    adv, ret = rm.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    assert close(adv, [[0.11425, 0.165, 0.3]])
    assert close(ret, [[0.61425, 0.765, 1.0]])
    adv_ref, ret_ref = rm.gae_reference(rewards, values, mask, gamma=0.9, lam=0.5)
    assert close(adv_ref, [[0.11425, 0.165, 0.3]])  # float32 inputs: 1e-6, not exact
    assert close(ret_ref, [[0.61425, 0.765, 1.0]])
    # a padding position with garbage reward/value changes nothing and gets 0
    adv_p, ret_p = rm.gae(torch.tensor([[0.0, 0.0, 1.0, 3.0]]), torch.tensor([[0.5, 0.6, 0.7, 5.0]]),
                          torch.tensor([[1, 1, 1, 0]]), gamma=0.9, lam=0.5)
    assert close(adv_p, [[0.11425, 0.165, 0.3, 0.0]])
    assert close(ret_p, [[0.61425, 0.765, 1.0, 0.0]])


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_gae_matches_reference_with_padding(seed):
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 7
    rewards = torch.randn(B, T, generator=g)
    values = torch.randn(B, T, generator=g)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    ar = torch.arange(T)
    mask = (ar[None, :] < lengths[:, None]).long()  # right padding
    mask[1] = (ar >= T - int(lengths[1])).long()  # left padding
    mask[2] = 0  # empty row
    mask[3] = torch.tensor([0, 1, 1, 0, 1, 1, 0])  # holes act as episode ends
    gamma = [1.0, 0.99, 0.9, 1.0, 0.95][seed]
    lam = [0.95, 1.0, 0.5, 0.0, 0.9][seed]
    adv, ret = rm.gae(rewards, values, mask, gamma=gamma, lam=lam)
    adv_ref, ret_ref = rm.gae_reference(rewards, values, mask, gamma=gamma, lam=lam)
    assert close(adv, adv_ref, 1e-5)
    assert close(ret, ret_ref, 1e-5)
    assert float(adv[mask == 0].abs().max()) == 0.0


# ---------------------------------------------------------------- PPO losses

def test_policy_loss_hand_example_one_clipped():
    ratios = [1.5, 1.0, 0.5, 1.1]
    logprobs = torch.tensor([[math.log(r) for r in ratios]], requires_grad=True)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0, 1]])  # the 0.5-ratio token is padding
    # t0: pg1 = -1.5, pg2 = -1.2 -> -1.2 (clipped); t1: -1.0; t3: pg1 = pg2 = 1.1 -> 1.1 (not clipped)
    loss, diag = rm.policy_loss(logprobs, old, adv, mask, clip=0.2)
    assert close(loss, (-1.2 - 1.0 + 1.1) / 3)
    assert close(diag["clipfrac"], 1 / 3)
    assert close(diag["approx_kl"], (0.5 * math.log(1.5) ** 2 + 0.0 + 0.5 * math.log(1.1) ** 2) / 3)
    loss.backward()
    # clipped and padded tokens get no gradient; d/dlogp of -A*ratio/3 = -A*ratio/3
    assert close(logprobs.grad, [[0.0, -1.0 / 3, 0.0, 1.1 / 3]], 1e-6)


def test_value_loss_hand_example():
    values = torch.tensor([[1.0, 0.5, 9.0]])
    old = torch.tensor([[0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    # t0: v_clipped = 0.7; (1-2)^2 = 1, (0.7-2)^2 = 1.69 -> 1.69 (clipped); t1: 0.25
    loss, diag = rm.value_loss(values, old, returns, mask, clip=0.2)
    assert close(loss, 0.5 * (1.69 + 0.25) / 2)
    assert close(diag["vf_clipfrac"], 0.5)


def test_token_weighted_microbatch_mean_equals_global_mean():
    """OpenRLHF check: micro-batch losses weighted by token counts give the global token mean."""
    g = torch.Generator().manual_seed(0)
    B, T = 4, 5
    logprobs = torch.randn(B, T, generator=g) * 0.3
    old = torch.randn(B, T, generator=g) * 0.3
    adv = torch.randn(B, T, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]])
    full, _ = rm.policy_loss(logprobs, old, adv, mask)
    l1, _ = rm.policy_loss(logprobs[:2], old[:2], adv[:2], mask[:2])
    l2, _ = rm.policy_loss(logprobs[2:], old[2:], adv[2:], mask[2:])
    n1, n2 = int(mask[:2].sum()), int(mask[2:].sum())
    assert (n1, n2) == (9, 3)
    assert close((l1 * n1 + l2 * n2) / (n1 + n2), full)
    assert not close((l1 + l2) / 2, full)  # the naive mean of micro-batch means is biased


# ---------------------------------------------------------------- logits utilities / diagnostics

def test_entropy_and_logprobs_from_logits():
    logits = torch.zeros(1, 2, 4)
    logits[0, 1] = torch.tensor([0.0, math.log(3.0), -1e4, -1e4])  # probs 0.25, 0.75, 0, 0
    h = rm.entropy_from_logits(logits)
    assert close(h, [[math.log(4.0), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]], 1e-5)
    labels = torch.tensor([[3, 1]])
    lp = rm.logprobs_from_logits(logits, labels)
    assert close(lp, [[math.log(0.25), math.log(0.75)]], 1e-6)
    ref = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert close(lp, ref, 1e-6)


def test_explained_variance():
    mask = torch.tensor([[1, 1, 1, 0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    assert rm.explained_variance(returns, returns, mask) == 1.0
    assert rm.explained_variance(torch.zeros(1, 4), torch.full((1, 4), 2.0), mask) == 0.0
    # R - V = [0, 0, 1]: var = 1/3; Var[R] = 1
    assert close(rm.explained_variance(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), returns, mask), 2.0 / 3.0, 1e-12)


def test_best_of_n_kl_bound():
    assert rm.best_of_n_kl_bound(1) == 0.0
    assert close(rm.best_of_n_kl_bound(2), math.log(2.0) - 0.5, 1e-15)
    assert close(rm.best_of_n_kl_bound(4), math.log(4.0) - 0.75, 1e-15)
    with pytest.raises(ValueError):
        rm.best_of_n_kl_bound(0)

"""Pure math of iterative RLHF: reward-model loss, reward shaping, GAE and PPO losses.

Scope: every function here is a small, stateless tensor function (no models, no
optimisers, no I/O, no device or distributed logic) so that it can be imported
and unit-tested on CPU with hand-computed tensors. Only ``torch`` and the
standard library are imported.

Conventions used throughout:

* ``B`` is the batch size, ``T`` the (response) sequence length, ``V`` the
  vocabulary size.
* A ``mask`` of shape ``(B, T)`` is 1 (or True) on *response* tokens, i.e. the
  tokens the policy generated and is trained on, and 0 on prompt and padding
  tokens. Masked positions never contribute to a mean, and the per-token
  outputs of this module are 0 there.
* ``logp`` / ``logprobs`` are log-probabilities of the *sampled* tokens, shape
  ``(B, T)``, not full distributions.
* Losses return ``(loss, diagnostics)`` where ``diagnostics`` is a dict of
  detached 0-dim tensors (call ``.item()`` when logging; keeping tensors avoids a
  device sync per step), in the style of OpenRLHF / TRL.

References:

* Llama 2: Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat
  Models", arXiv:2307.09288, §3.2.2 (reward modeling, eq. 1-2, Table 27
  margins) and §3.2.3 (iterative fine-tuning: rejection sampling, PPO, eq. 3-4).
* InstructGPT: Ouyang et al. 2022, arXiv:2203.02155 (per-token KL penalty).
* GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using
  Generalized Advantage Estimation", arXiv:1506.02438.
* PPO: Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
  arXiv:1707.06347.
* KL estimators k1/k2/k3: J. Schulman, "Approximating KL Divergence" (2020),
  http://joschu.net/blog/kl-approx.html.
* Best-of-N KL: Gao et al. 2022 arXiv:2210.10760; Beirami et al. 2024
  arXiv:2401.01879.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LEVELS",
    "MARGINS",
    "WhitenStats",
    "best_of_n_kl_bound",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "gae_reference",
    "gate",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "last_token_index",
    "logit",
    "logprobs_from_logits",
    "margin_for",
    "margin_ranking_loss",
    "margins_for",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "policy_loss",
    "token_rewards",
    "value_loss",
    "whiten",
]

# ---------------------------------------------------------------------------
# Reward modelling (Llama 2 §3.2.2)
# ---------------------------------------------------------------------------

#: Preference-rating levels of the Llama 2 annotation protocol, strongest first.
LEVELS: tuple[str, ...] = ("significantly_better", "better", "slightly_better", "negligibly_better")

#: Margin m(r) per rating level (Llama 2 §3.2.2, Table 27). "none" is the plain
#: binary ranking loss (eq. 1); "small" and "large" are the two margin schemes.
MARGINS: dict[str, dict[str, float]] = {
    "none": {level: 0.0 for level in LEVELS},
    "small": dict(zip(LEVELS, (1.0, 2.0 / 3.0, 1.0 / 3.0, 0.0), strict=True)),
    "large": dict(zip(LEVELS, (3.0, 2.0, 1.0, 0.0), strict=True)),
}


def margin_for(level: str | None, scheme: str) -> float:
    """Margin m(r) for one preference rating level (Llama 2 §3.2.2, Table 27).

    Args:
        level: one of :data:`LEVELS`, or ``None`` for a pair without a rating
            (margin 0.0).
        scheme: one of the keys of :data:`MARGINS` (``"none"``, ``"small"``,
            ``"large"``). The scheme is validated even when ``level`` is None.

    Returns:
        The margin as a float.

    Raises:
        ValueError: unknown scheme or level; the message names the allowed values.
    """
    if scheme not in MARGINS:
        raise ValueError(f"unknown margin scheme {scheme!r}; expected one of {sorted(MARGINS)}")
    if level is None:
        return 0.0
    if level not in MARGINS[scheme]:
        raise ValueError(f"unknown preference level {level!r}; expected one of {list(LEVELS)} or None")
    return MARGINS[scheme][level]


def margins_for(
    levels: list[str | None] | tuple[str | None, ...], scheme: str, device: torch.device | str | None = None
) -> Tensor:
    """Vector of margins for a batch of rating levels; see :func:`margin_for`.

    Args:
        levels: length-B sequence of level names (or None).
        scheme: margin scheme name.
        device: device of the returned tensor.

    Returns:
        Float32 tensor of shape (B,).
    """
    return torch.tensor([margin_for(level, scheme) for level in levels], dtype=torch.float32, device=device)


def margin_ranking_loss(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Binary ranking loss with margin for reward-model training (Llama 2 eq. 2).

    ``L = -log(sigmoid(r(x, y_c) - r(x, y_r) - m(r)))``, averaged over the batch;
    with ``margin=None`` (or 0) this is eq. 1 (InstructGPT).

    Args:
        chosen_rewards: (B,) scalar RM scores of the preferred responses.
        rejected_rewards: (B,) scores of the rejected responses.
        margin: (B,) tensor, a float applied to all pairs, or None (no margin).

    Returns:
        ``(loss, diagnostics)``: ``loss`` is a 0-dim tensor; ``diagnostics`` has
        ``accuracy`` (fraction of pairs with r_c > r_r, strictly) and
        ``score_margin`` (mean of r_c - r_r), both detached 0-dim tensors.
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    if margin is not None:
        diff_m = diff - margin  # (B,)
    else:
        diff_m = diff
    loss = -F.logsigmoid(diff_m).mean()  # ()
    with torch.no_grad():
        accuracy = (chosen_rewards > rejected_rewards).float().mean()  # ()
        score_margin = diff.float().mean()  # ()
    return loss, {"accuracy": accuracy.detach(), "score_margin": score_margin.detach()}


def gate(
    r_helpful: Tensor, r_safety: Tensor, is_safety: Tensor, threshold: float = 0.15
) -> tuple[Tensor, Tensor]:
    """Piecewise combination of the two reward models (Llama 2 §3.2.3, eq. 3).

    ``R_c = R_s`` if the prompt is a safety prompt or ``R_s < threshold``
    (strictly), else ``R_h``. Llama 2 uses threshold 0.15 on the sigmoid-scaled
    safety score.

    Args:
        r_helpful: (B,) helpfulness RM output mapped to [0, 1] (sigmoid of score).
        r_safety: (B,) safety RM output mapped to [0, 1].
        is_safety: (B,) bool, True for prompts tagged as safety-relevant.
        threshold: safety score below which the safety RM takes over.

    Returns:
        ``(r_c, used_safety)``: (B,) combined reward in [0, 1] and the (B,) bool
        mask ``is_safety | (r_safety < threshold)`` telling which RM was used.
    """
    used_safety = is_safety.bool() | (r_safety < threshold)  # (B,)
    r_c = torch.where(used_safety, r_safety, r_helpful)  # (B,)
    return r_c, used_safety


def logit(p: Tensor, eps: float = 1e-6) -> Tensor:
    """Inverse sigmoid ``log(p / (1 - p))`` with ``p`` clamped to [eps, 1 - eps].

    Llama 2 §3.2.3 reverses the sigmoid of the gated reward before whitening,
    ``R~_c = WHITEN(LOGIT(R_c))``. The clamp keeps p = 0 and p = 1 finite.

    Args:
        p: probabilities of any shape.
        eps: clamp width.

    Returns:
        Tensor of the same shape as ``p``.
    """
    return torch.logit(p, eps=eps)


def whiten(x: Tensor, mean: float | Tensor, std: float | Tensor, eps: float = 1e-8) -> Tensor:
    """Standardise with given statistics: ``(x - mean) / max(std, eps)``.

    Used for the WHITEN of Llama 2 eq. 4 with statistics fixed in advance
    (see :class:`WhitenStats`). With zero variance (std = 0) the clamp avoids a
    division by zero, and values equal to the mean map to exactly 0 (no NaN);
    values away from the mean are divided by ``eps`` and so become large.

    Args:
        x: tensor of any shape.
        mean: scalar mean (float or 0-dim tensor).
        std: scalar standard deviation (float or 0-dim tensor), >= 0.
        eps: lower bound on ``std``.

    Returns:
        Tensor of the same shape as ``x``.
    """
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).clamp(min=eps)  # ()
    return (x - mean) / std_t


@dataclass(frozen=True)
class WhitenStats:
    """Fixed whitening statistics (mean, population std) of a reward distribution."""

    mean: float
    std: float

    @classmethod
    def fit(cls, x: Tensor, eps: float = 1e-8) -> WhitenStats:
        """Fit mean and population std (``unbiased=False``) of all elements of ``x``.

        Computed in float64 so that a constant input gives its value back
        exactly as the mean (and hence ``apply`` returns exact zeros). ``std`` is
        stored clamped to at least ``eps``; a single element gives std = eps.

        Args:
            x: tensor of any shape with at least one element.
            eps: lower bound on the stored std.

        Raises:
            ValueError: ``x`` is empty.
        """
        if x.numel() == 0:
            raise ValueError("cannot fit whitening statistics on an empty tensor")
        xd = x.detach().double().flatten()  # (N,)
        mean = float(xd.mean())
        std = float(xd.std(unbiased=False))
        return cls(mean=mean, std=max(std, eps))

    def apply(self, x: Tensor, eps: float = 1e-8) -> Tensor:
        """``whiten(x, self.mean, self.std, eps)``; same shape as ``x``."""
        return whiten(x, self.mean, self.std, eps)


# ---------------------------------------------------------------------------
# Masked reductions
# ---------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over positions where ``mask`` is 1.

    Masked positions are selected out with ``torch.where`` (not multiplied), so
    NaN/inf at padding positions do not leak into the result.

    Args:
        x: (B, T) values (any shape matching ``mask``).
        mask: (B, T) 1/True on response tokens, 0/False on prompt and padding.
        dim: reduce over this dimension, or over all elements if None.

    Returns:
        0-dim tensor if ``dim`` is None, else ``x`` reduced over ``dim``.
    """
    xm = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))  # (B, T)
    return xm.sum() if dim is None else xm.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (token-level mean).

    An all-zero mask (globally, or for one row when ``dim`` is given) returns 0,
    not NaN: the count is clamped to at least 1.

    Args:
        x: (B, T) values.
        mask: (B, T) 1 on response tokens, 0 on prompt and padding.
        dim: reduce over this dimension, or over all elements if None.

    Returns:
        0-dim tensor if ``dim`` is None, else ``x`` reduced over ``dim``.
    """
    count = masked_sum(torch.ones_like(x), mask, dim).clamp(min=1)  # () or reduced shape
    return masked_sum(x, mask, dim) / count


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over all positions where ``mask`` is 1.

    With ``unbiased=True`` Bessel's correction n / (n - 1) is applied when the
    token count n > 1; for n <= 1 the (biased, = 0) value is returned rather
    than NaN/inf.

    Args:
        x: (B, T) values.
        mask: (B, T) 1 on response tokens, 0 on prompt and padding.
        unbiased: apply Bessel's correction.

    Returns:
        0-dim tensor.
    """
    mean = masked_mean(x, mask)  # ()
    var = masked_mean((x - mean) ** 2, mask)  # ()
    if unbiased:
        n = masked_sum(torch.ones_like(x), mask)  # ()
        bessel = torch.where(n > 1, n / (n - 1).clamp(min=1), torch.ones_like(n))  # ()
        var = var * bessel
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten ``x`` with its own masked mean and (unbiased) variance.

    ``(x - mean) / sqrt(var + eps)``; with ``shift_mean=False`` the mean is
    added back (only the scale changes), as done for PPO advantages in
    TRL/OpenRLHF. Masked positions of the output are 0.

    Args:
        x: (B, T) values, e.g. advantages.
        mask: (B, T) 1 on response tokens, 0 on prompt and padding.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the variance.

    Returns:
        (B, T) tensor.
    """
    mean = masked_mean(x, mask)  # ()
    var = masked_var(x, mask)  # ()
    whitened = (x - mean) * torch.rsqrt(var + eps)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros((), dtype=whitened.dtype, device=x.device))


# ---------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence")
# ---------------------------------------------------------------------------
# Tokens are sampled from the policy q; the reference is p; log r = ref_logp - logp.
# Each estimator's expectation under q is (k1, k3) or approximates (k2) KL(q || p).


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = -log r = logp - ref_logp: unbiased for KL(policy || ref), high variance, can be < 0.

    Args:
        logp: (B, T) log-probs of the sampled tokens under the policy.
        ref_logp: (B, T) log-probs of the same tokens under the reference.

    Returns:
        (B, T) per-token estimate (not masked).
    """
    return logp - ref_logp  # (B, T)


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 0.5 * (log r)^2: biased, low variance, always >= 0.

    Args:
        logp: (B, T) policy log-probs of the sampled tokens.
        ref_logp: (B, T) reference log-probs of the same tokens.

    Returns:
        (B, T) per-token estimate (not masked).
    """
    return 0.5 * (logp - ref_logp) ** 2  # (B, T)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with r = exp(ref_logp - logp): unbiased, low variance, >= 0.

    Args:
        logp: (B, T) policy log-probs of the sampled tokens.
        ref_logp: (B, T) reference log-probs of the same tokens.

    Returns:
        (B, T) per-token estimate (not masked).
    """
    log_r = ref_logp - logp  # (B, T)
    return torch.expm1(log_r) - log_r  # (B, T)


_KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k1") -> Tensor:
    """Per-token KL(policy || ref) estimate of the given ``kind`` (k1, k2 or k3).

    Args:
        logp: (B, T) policy log-probs of the sampled tokens.
        ref_logp: (B, T) reference log-probs.
        kind: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        (B, T) per-token estimate (not masked).

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind not in _KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {kind!r}; expected one of {sorted(_KL_ESTIMATORS)}")
    return _KL_ESTIMATORS[kind](logp, ref_logp)


# ---------------------------------------------------------------------------
# Reward shaping and advantages
# ---------------------------------------------------------------------------


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last position with ``mask == 1`` in each row.

    Works for left and right padding. Rows with an all-zero mask get index 0
    (callers must check ``mask.any(-1)``).

    Args:
        mask: (B, T) 1 on response tokens.

    Returns:
        (B,) int64 indices.
    """
    T = mask.shape[-1]
    # argmax returns the first maximal index; on the flipped mask that is the last 1.
    flipped_first = mask.bool().flip(-1).to(torch.int8).argmax(dim=-1)  # (B,)
    idx = (T - 1) - flipped_first  # (B,)
    return torch.where(mask.bool().any(dim=-1), idx, torch.zeros_like(idx))


def token_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """Per-token PPO reward: KL penalty on every response token, score on the last one.

    Llama 2 eq. 4 (after InstructGPT): ``R = R~_c - beta * D_KL(pi || pi_0)``,
    with the KL estimated per token by k1 (:func:`kl_k1`) and the sequence
    score added to the reward of the last response token of each row (last
    index where mask == 1; left or right padding). Masked positions are 0.
    Rows whose mask is all zero get no score. Inputs are expected to be
    detached (rewards are constants for PPO).

    Args:
        scores: (B,) sequence-level reward, e.g. the whitened gated score.
        logprobs: (B, T) policy log-probs of the sampled tokens (at rollout).
        ref_logprobs: (B, T) reference-model log-probs of the same tokens.
        mask: (B, T) 1 on response tokens, 0 on prompt and padding.
        beta: KL coefficient.

    Returns:
        ``(rewards, kl)``: both (B, T); ``kl`` is the masked per-token k1 estimate.
    """
    m = mask.bool()  # (B, T)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    kl = torch.where(m, kl_k1(logprobs, ref_logprobs), zero)  # (B, T)
    rewards = -beta * kl  # (B, T)
    idx = last_token_index(mask)  # (B,)
    has_response = m.any(dim=-1)  # (B,)
    score_add = torch.where(has_response, scores.to(rewards.dtype), zero)  # (B,)
    rewards = rewards.scatter_add(1, idx.unsqueeze(-1), score_add.unsqueeze(-1))  # (B, T)
    return rewards, kl


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016), vectorised over B.

    ``delta_t = r_t + gamma * V_{t+1} * nonterminal_{t+1} - V_t`` and
    ``A_t = delta_t + gamma * lam * nonterminal_{t+1} * A_{t+1}`` (``lastgaelam``),
    with a reverse loop over T. A position is non-terminal only if it is a
    response token (mask == 1): the value after the last response token (and
    after any masked position) is 0, so left/right padding and holes in the
    mask all act as episode ends. Advantages and returns are 0 at masked
    positions. Returns are ``A_t + V_t`` (the value targets).

    Args:
        rewards: (B, T) per-token rewards (see :func:`token_rewards`).
        values: (B, T) value estimates V(s_t) at rollout.
        mask: (B, T) 1 on response tokens, 0 on prompt and padding.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both (B, T). No detaching is done here: call
        under ``torch.no_grad()`` (or pass detached inputs) in PPO.
    """
    B, T = rewards.shape
    m = mask.to(values.dtype)  # (B, T)
    lastgaelam = torch.zeros(B, dtype=values.dtype, device=values.device)  # (B,)
    adv_rev = []
    for t in reversed(range(T)):
        if t + 1 < T:
            nextnonterminal = m[:, t + 1]  # (B,)
            nextvalues = values[:, t + 1] * nextnonterminal  # (B,)
        else:
            nextnonterminal = torch.zeros_like(lastgaelam)  # (B,)
            nextvalues = torch.zeros_like(lastgaelam)  # (B,)
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]  # (B,)
        lastgaelam = (delta + gamma * lam * nextnonterminal * lastgaelam) * m[:, t]  # (B,)
        adv_rev.append(lastgaelam)
    advantages = torch.stack(adv_rev[::-1], dim=1)  # (B, T)
    returns = (advantages + values) * m  # (B, T)
    return advantages, returns


def gae_reference(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Plain-Python GAE straight from the definition, for testing :func:`gae`.

    Per row, each maximal run of mask == 1 is an episode ending in a terminal
    state (value 0 after it). Within a run, with ``delta_t = r_t + gamma V_{t+1} - V_t``,
    ``A_t = sum_{l >= 0} (gamma lam)^l delta_{t+l}`` is summed term by term
    (O(T^2), Schulman et al. 2016 eq. 16). Masked positions get 0.

    Args:
        rewards: (B, T) per-token rewards.
        values: (B, T) values.
        mask: (B, T) 1 on response tokens, 0 on prompt and padding.
        gamma: discount factor.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both (B, T) float64 tensors on CPU.
    """
    r = rewards.detach().double().cpu().tolist()
    v = values.detach().double().cpu().tolist()
    mk = mask.detach().bool().cpu().tolist()
    B = len(r)
    T = len(r[0]) if B else 0
    adv = [[0.0] * T for _ in range(B)]
    ret = [[0.0] * T for _ in range(B)]
    for b in range(B):
        # delta for each response token; the successor value counts only if it is a response token.
        delta = [0.0] * T
        for t in range(T):
            if mk[b][t]:
                next_v = v[b][t + 1] if t + 1 < T and mk[b][t + 1] else 0.0
                delta[t] = r[b][t] + gamma * next_v - v[b][t]
        for t in range(T):
            if not mk[b][t]:
                continue
            total, coef, k = 0.0, 1.0, t
            while k < T and mk[b][k]:
                total += coef * delta[k]
                coef *= gamma * lam
                k += 1
            adv[b][t] = total
            ret[b][t] = total + v[b][t]
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(ret, dtype=torch.float64)


# ---------------------------------------------------------------------------
# PPO losses (Schulman et al. 2017)
# ---------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss.

    ``ratio = exp(logprobs - old_logprobs)``, ``pg_loss1 = -A * ratio``,
    ``pg_loss2 = -A * clamp(ratio, 1 - clip, 1 + clip)``; the loss is the masked
    token-level mean of ``max(pg_loss1, pg_loss2)``.

    Args:
        logprobs: (B, T) log-probs of the sampled tokens under the current policy (with grad).
        old_logprobs: (B, T) log-probs under the rollout policy (detached).
        advantages: (B, T) advantages (detached, usually whitened).
        mask: (B, T) 1 on response tokens, 0 on prompt and padding.
        clip: clipping range epsilon.

    Returns:
        ``(loss, diagnostics)``: 0-dim loss; ``clipfrac`` = masked fraction of
        tokens where the clipped term is active (``pg_loss2 > pg_loss1``), and
        ``approx_kl`` = masked mean of the k2 estimator ``0.5 * logratio^2``
        of KL(old || new) (as in TRL), both detached.
    """
    logratio = logprobs - old_logprobs  # (B, T)
    ratio = torch.exp(logratio)  # (B, T)
    pg_loss1 = -advantages * ratio  # (B, T)
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)  # (B, T)
    pg_losses = torch.max(pg_loss1, pg_loss2)  # (B, T)
    loss = masked_mean(pg_losses, mask)  # ()
    with torch.no_grad():
        clipfrac = masked_mean((pg_loss2 > pg_loss1).to(logratio.dtype), mask)  # ()
        approx_kl = masked_mean(0.5 * logratio**2, mask)  # ()
    return loss, {"clipfrac": clipfrac.detach(), "approx_kl": approx_kl.detach()}


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value-function loss (PPO2 / InstructGPT-style critics).

    ``v_clipped = old_values + clamp(values - old_values, -clip, clip)``; the loss
    is ``0.5 * masked_mean(max((v - R)^2, (v_clipped - R)^2))``.

    Args:
        values: (B, T) current value predictions (with grad).
        old_values: (B, T) value predictions at rollout (detached).
        returns: (B, T) value targets from :func:`gae` (detached).
        mask: (B, T) 1 on response tokens, 0 on prompt and padding.
        clip: value clipping range.

    Returns:
        ``(loss, diagnostics)``: 0-dim loss; ``vf_clipfrac`` = masked fraction
        of tokens where the clipped error is the larger one (detached).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)  # (B, T)
    vf_loss1 = (values - returns) ** 2  # (B, T)
    vf_loss2 = (v_clipped - returns) ** 2  # (B, T)
    loss = 0.5 * masked_mean(torch.max(vf_loss1, vf_loss2), mask)  # ()
    with torch.no_grad():
        vf_clipfrac = masked_mean((vf_loss2 > vf_loss1).to(values.dtype), mask)  # ()
    return loss, {"vf_clipfrac": vf_clipfrac.detach()}


# ---------------------------------------------------------------------------
# Logits utilities and diagnostics
# ---------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution softmax(logits) at each position.

    ``H = logsumexp(z) - sum(softmax(z) * z)``. Computed in float32.

    Args:
        logits: (B, T, V).

    Returns:
        (B, T) entropies in nats (not masked).
    """
    z = logits.float()  # (B, T, V)
    probs = torch.softmax(z, dim=-1)  # (B, T, V)
    return torch.logsumexp(z, dim=-1) - (probs * z).sum(dim=-1)  # (B, T)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of ``labels`` under softmax(logits): gather of log_softmax.

    Computed as ``z[label] - logsumexp(z)`` in float32, which equals
    ``log_softmax(z).gather(-1, labels)`` without materialising the (B, T, V)
    log_softmax. Callers align logits and labels (logits[:, :-1] vs input_ids[:, 1:]).

    Args:
        logits: (B, T, V).
        labels: (B, T) int64 token ids.

    Returns:
        (B, T) float32 log-probs (not masked).
    """
    z = logits.float()  # (B, T, V)
    picked = z.gather(dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return picked - torch.logsumexp(z, dim=-1)  # (B, T)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, eps: float = 1e-8) -> float:
    """Explained variance of value predictions: ``1 - Var[R - V] / Var[R]`` over response tokens.

    1 is a perfect critic, 0 is no better than a constant, < 0 is worse. When
    Var[R] <= eps (e.g. constant returns) 0.0 is returned instead of NaN/inf.
    Computed in float64.

    Args:
        values: (B, T) value predictions.
        returns: (B, T) value targets.
        mask: (B, T) 1 on response tokens, 0 on prompt and padding.
        eps: variance floor below which the result is 0.0.

    Returns:
        Python float.
    """
    v = values.detach().double()  # (B, T)
    r = returns.detach().double()  # (B, T)
    var_r = float(masked_var(r, mask))
    if not math.isfinite(var_r) or var_r <= eps:
        return 0.0
    return 1.0 - float(masked_var(r - v, mask)) / var_r


def best_of_n_kl_bound(n: int) -> float:
    """KL(best-of-n || base) bound ``log n - (n - 1) / n`` (Gao et al. 2022; Beirami et al. 2024).

    The analytic KL commonly quoted for best-of-n sampling, shown by Beirami
    et al. to be an upper bound. Used to report how far a rejection-sampling
    round (Llama 2 §3.2.3) moves from the sampling policy.

    Args:
        n: number of samples, >= 1.

    Returns:
        The bound in nats (0.0 for n = 1).

    Raises:
        ValueError: ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n

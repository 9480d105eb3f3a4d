"""iterative-rlhf: Llama-2-style iterative RLHF.

Two reward models (helpfulness, safety) trained with a margin ranking loss,
combined by a gated scorer; rounds V1..Vn of best-of-N rejection sampling
(vLLM or HF generate) and fine-tuning, finished by PPO against the gated
reward with a KL penalty to a frozen reference. TinyWorld is the built-in
world with a gold judge that the default campaign and the tests run on.
"""

__version__ = "0.1.0"

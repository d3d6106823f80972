"""QAT's run length from the amount of training text (issue 29), when the caller does not give `steps`.

    tokens per step = batch_size x seq_len                     (8 x 128 on a dense model, 32 x 128 on an MoE one)
    steps           = MAX_EPOCHS x training tokens / tokens per step, within [MIN_STEPS, MAX_STEPS]
    report:           epochs over the text = steps x tokens per step / training tokens,
                      tokens seen per parameter = steps x tokens per step / the model's parameters

Why these numbers (docs/qat.md, "How the defaults were chosen"): every rate of the recipe was measured at 1000
steps (MAX_STEPS): 8 x 128 tokens a step over the bundled 833k-token training text on the dense fixtures (1.2
epochs, 0.31 tokens seen per parameter), 32 x 128 on tiny-moe (4.9 epochs, 1.2 tokens per parameter). A smaller
text would be repeated more than that; MAX_EPOCHS = 5, the most any measured run repeated its text, stops there
(the held-out selection of heldout.py guards what repetition remains). MIN_STEPS = 400: a text too small for
400 steps within 5 epochs is repeated more rather than trained less. Chosen on tiny-dense with a 114 KB slice of
the bundled training text (held-out selection KL of the GPTQ start 0.00333; the bundled held-out set's share of
GPTQ's KL removed in brackets), seeds 0 and 1: 200 steps at 4x the rates 0.00170, 0.00175 (42.1%, 41.5%), 400
steps at 2.5x 0.00158, 0.00161 (45.5%, 45.2%); in all the best held-out state was the last step, so the 200-step
runs stopped while still improving.

    batch_size x seq_len = 8 x 128 (32 x 128 on an MoE model: train.default_batch_size), whatever the text

Not set from the text: on the same slice 400 steps of 4 x 128 tokens (the compute of 200 steps of 8) reached
0.00173 (42.4%, seed 0), no better than 200 steps of 8, so a small text gets more steps, not smaller batches. The
sequence length stays at the 128 tokens every rate was measured with.

    rates           = lr, scale_lr x min(4, max(1, 1000 / steps))   where the caller left them unset

The rates are in grid steps per step (train.param_groups) and were measured at 1000 steps; a shorter run moves
the weights and scales less in all (1000 / steps keeps steps x rate, how far they can move, at the measured
run's). Earlier sessions found 4x the rates the better choice at 500 steps; on tiny-dense with 98 KB of the
bundled text (200 steps) the held-out KL after 130 steps was 0.00282 at 4x against 0.00286 at 1x (GPTQ start
0.00423). 4x is the highest rate measured not to flip codes on gradient noise, hence the cap; at MIN_STEPS the
scale is 2.5x. The float and embedding rates, where most of a short run's gain comes from, are left as they are.
"""

from __future__ import annotations

import dataclasses
import math

MAX_EPOCHS = 5.0
MIN_STEPS, MAX_STEPS = 400, 1000
REFERENCE_STEPS, MAX_RATE_SCALE = 1000, 4.0


def default_steps(train_tokens: int, batch_size: int, seq_len: int) -> int:
    return max(MIN_STEPS, min(MAX_STEPS, math.floor(MAX_EPOCHS * train_tokens / (batch_size * seq_len))))


def rate_scale(steps: int) -> float:
    """How much the latent-weight and scale rates are raised for a run of `steps`: REFERENCE_STEPS / steps,
    within [1, MAX_RATE_SCALE] (see the module docstring)."""
    return min(MAX_RATE_SCALE, max(1.0, REFERENCE_STEPS / steps))


def for_data(r, train_tokens: int):
    """The recipe with steps resolved from the training text when it is None (batch_size already resolved), then
    lr and scale_lr, where unset, from the run length."""
    from gemmaquant.qat.train import LR, SCALE_LR

    if r.steps is None:
        r = dataclasses.replace(r, steps=default_steps(train_tokens, r.batch_size, r.seq_len))
    k = rate_scale(r.steps)
    return dataclasses.replace(r, lr=LR * k if r.lr is None else r.lr,
                               scale_lr=SCALE_LR * k if r.scale_lr is None else r.scale_lr)


def exposure(r, train_tokens: int, params: int) -> dict:
    """How much of the text and how many tokens per parameter the run sees (for the report)."""
    seen = r.steps * r.batch_size * r.seq_len
    return {"train_tokens": train_tokens, "tokens_seen": seen, "epochs": round(seen / max(train_tokens, 1), 3),
            "tokens_per_param": round(seen / max(params, 1), 4)}

"""Text generation as pure functions: a choice of the next id from logits, and a decode loop
over a model's step function with explicit state (mamba's ``utils/generation.py`` layout).

Every language model here generates the same way (``cvfp predict``, ``cvfp generate``, the
CVFP model and the baselines):

    state, logits = step(state, prompt_ids[None])        # read the prompt, logits (1, V) of its last id
    repeat max_new_tokens times:
        next = choose(logits)                             # greedy, or a sample of the warped logits
        state, logits = step(state, next[None, None])     # (not after the last id)

``step(state, ids (B, t)) -> (state, logits (B, V))`` reads ``t`` ids and returns the logits
after the last one; what ``state`` holds is the model's business (the CVFP context, a
recurrent state, the ids so far).

Choosing (:func:`sample_next`): ``greedy`` takes ``argmax``; otherwise the logits go
through ``transformers``' warpers in the order ``generate`` applies them (temperature,
then top-k, then top-p: ``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper`` in a ``LogitsProcessorList``) and one id is drawn from the softmax of
the result with ``torch.multinomial`` on the CPU. A ``seed`` gives a fresh
``torch.Generator`` per call of :func:`decode`, so one prompt's continuation does not depend
on what was generated before it; without one the global RNG is used.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from cvfp_lightning.errors import check

Step = Callable[[Any, Tensor], tuple[Any, Tensor]]


def check_sampling(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   max_new_tokens: int = 1, prefix: str = "") -> None:
    """CVFPUserError unless ``temperature > 0``, ``top_k`` a positive integer or None,
    ``0 < top_p <= 1`` or None, ``max_new_tokens`` a positive integer (names shown with ``prefix``)."""
    check(isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0,
          f"{prefix}temperature={temperature!r} is invalid: expected a number > 0 (use {prefix}greedy: true for "
          "the most likely token).")
    check(top_k is None or (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > 0),
          f"{prefix}top_k={top_k!r} is invalid: expected a positive integer or null (all ids).")
    check(top_p is None or (isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and 0 < top_p <= 1),
          f"{prefix}top_p={top_p!r} is invalid: expected a number in (0, 1] or null (no nucleus filter).")
    check(isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and max_new_tokens > 0,
          f"{prefix}max_new_tokens={max_new_tokens!r} is invalid: expected a positive integer.")


def logits_warpers(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """The ``transformers.LogitsProcessorList`` of sampling: temperature, top-k, top-p (each only when it acts)."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = LogitsProcessorList()
    if float(temperature) != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k is not None:
        warpers.append(TopKLogitsWarper(int(top_k)))
    if top_p is not None and float(top_p) < 1.0:
        warpers.append(TopPLogitsWarper(float(top_p)))
    return warpers


def sample_next(logits: Tensor, input_ids: Tensor, warpers=None, greedy: bool = False,
                generator: torch.Generator | None = None) -> Tensor:
    """The next id of every row: ``logits (B, V)``, ``input_ids (B, t)`` (the ids so far) ``-> (B,)`` int64.

    ``greedy``: ``argmax``. Otherwise ``p = softmax(warpers(input_ids, logits))`` and one draw
    of ``torch.multinomial(p, 1, generator=generator)`` per row (on the CPU, so a seeded
    generator gives the same ids on every device).
    """
    scores = logits.float()
    if greedy:
        return scores.argmax(dim=-1)
    if warpers is not None:
        scores = warpers(input_ids, scores)
    probs = torch.softmax(scores, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=generator).reshape(-1).to(logits.device)


@torch.no_grad()
def decode(step: Step, state: Any, prompt_ids: Tensor, max_new_tokens: int, *, greedy: bool = False,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           seed: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Continue ``prompt_ids (T,)`` by ``max_new_tokens`` ids with ``step`` (see the module docstring) ``-> (max_new_tokens,)``.

    ``generator`` (or, when it is None, ``torch.Generator().manual_seed(seed)`` for a given
    ``seed``) draws the samples; neither: the global RNG.
    """
    check(prompt_ids.numel() > 0, "the prompt is empty: give at least one token of text.")
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if generator is None and seed is not None and not greedy:
        generator = torch.Generator().manual_seed(int(seed))
    warpers = None if greedy else logits_warpers(temperature, top_k, top_p)
    ids = prompt_ids.reshape(1, -1).long()
    state, logits = step(state, ids)
    out = []
    for k in range(max_new_tokens):
        nxt = sample_next(logits, ids, warpers, greedy, generator)  # (1,)
        out.append(int(nxt[0]))
        ids = torch.cat([ids, nxt.reshape(1, 1).to(ids.device)], dim=1)
        if k + 1 < max_new_tokens:
            state, logits = step(state, nxt.reshape(1, 1))
    return torch.tensor(out, dtype=torch.long)

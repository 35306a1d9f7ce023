"""Whether a checkpoint's weights fit the module they are loaded into, as one line.

Lightning's strict ``load_state_dict`` reports a shape mismatch as a multi-line
``RuntimeError`` (and, on resume, before the data module's own check of its tokens): a
vocabulary of another tokenizer makes the embedding ``(V', E)`` instead of ``(V, E)``.
"""

from __future__ import annotations

from torch import nn

from cvfp_lightning.errors import CVFPUserError


def shape_mismatches(own: dict, state: dict) -> list[str]:
    """``"name: checkpoint (..) vs model (..)"`` for every weight of both state dicts whose shapes differ."""
    return [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
            for k in sorted(set(own) & set(state))
            if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]


def check_checkpoint_fits(module: nn.Module, checkpoint: dict) -> None:
    """Raise one ``CVFPUserError`` naming the first mismatched weights when ``checkpoint`` does not fit."""
    state = checkpoint.get("state_dict")
    shapes = shape_mismatches(module.state_dict(), state) if isinstance(state, dict) else []
    if shapes:
        raise CVFPUserError(f"the checkpoint does not fit this {type(module).__name__} ({'; '.join(shapes[:3])}): "
                            "it was trained with another tokenizer (vocabulary size) or other model settings; use "
                            "the data and model settings of the run that wrote it.")

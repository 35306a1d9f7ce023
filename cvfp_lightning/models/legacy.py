"""Load checkpoints written before :class:`~cvfp_lightning.models.layers.ConcatLinear`.

Before ``ConcatLinear``, every Linear over a concatenation was one ``nn.Linear`` whose
weight covered ``[x; e]`` (or ``[e; x]``); it is now two blocks, ``state`` (``W_x``) and
``input`` (``W_e`` and the bias), the same function. Each block class lists its renames in
``legacy_renames()`` (old submodule name -> new name and, for a ``ConcatLinear``, which
part came first in the old concatenation, ``"state_first"`` or ``"input_first"``; ``None``
for a plain rename); :func:`upgrade_legacy_state_dict` rewrites an
old state dict in place so that ``load_state_dict`` takes it. A current checkpoint passes
through unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn


def upgrade_legacy_state_dict(state: dict[str, Tensor], model: nn.Module) -> int:
    """Rewrite the old-layout keys of ``state`` (keys named as in ``model.state_dict()``) in
    place; returns how many layers changed (0 for a current checkpoint)."""
    from cvfp_lightning.models.layers import ConcatLinear

    changed = 0
    for name, module in model.named_modules():
        renames = getattr(module, "legacy_renames", None)
        if renames is None:
            continue
        prefix = f"{name}." if name else ""
        for old, (new, order) in renames().items():
            old_w, old_b = f"{prefix}{old}.weight", f"{prefix}{old}.bias"
            if old_w not in state:
                continue
            if order is None:
                state[f"{prefix}{new}.weight"] = state.pop(old_w)
                if old_b in state:
                    state[f"{prefix}{new}.bias"] = state.pop(old_b)
            else:
                lin = module.get_submodule(new)
                assert isinstance(lin, ConcatLinear), f"{prefix}{new} is not a ConcatLinear"
                w = state.pop(old_w)
                n_state = lin.state.in_features
                n_input = w.shape[1] - n_state
                state_w, input_w = ((w[:, :n_state], w[:, n_state:]) if order == "state_first"
                                    else (w[:, n_input:], w[:, :n_input]))
                state[f"{prefix}{new}.state.weight"] = state_w.contiguous()
                state[f"{prefix}{new}.input.weight"] = input_w.contiguous()
                if old_b in state:
                    state[f"{prefix}{new}.input.bias"] = state.pop(old_b)
            changed += 1
    return changed


RESUME_REFUSED = ("this checkpoint was written by cvfp_lightning before its Linears over [x; e] were split in two "
                  "blocks: it loads for validate, test, predict and as Phase 2's phase1_checkpoint, but its "
                  "optimizer state cannot resume training; start a new fit.")


def is_legacy_state_dict(state: dict) -> bool:
    """Whether a CVFP module's state dict has the old layout (a context block without split layers)."""
    has_block = any(k.startswith(("updater.", "lm.updater.")) for k in state)
    return has_block and not any(k.endswith(".state.weight") for k in state)


def upgrade_checkpoint(module: nn.Module, checkpoint: dict) -> None:
    """``on_load_checkpoint`` step of every CVFP LightningModule: upgrade an old state dict.

    An old checkpoint loads for validate, test, predict and as Phase 2's Phase 1; resuming
    its training is refused, because its optimizer state belongs to the old parameters.
    """
    from cvfp_lightning.errors import CVFPUserError

    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not upgrade_legacy_state_dict(state, module):
        return
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and trainer.state.fn == "fit" and checkpoint.get("optimizer_states"):
        raise CVFPUserError(RESUME_REFUSED)

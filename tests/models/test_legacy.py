"""Checkpoints written before ConcatLinear (one Linear over [x; e]) still load."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cvfp_lightning.models import ContextConfig, TokenBlock, build_context_updater
from cvfp_lightning.models.legacy import upgrade_legacy_state_dict
from helpers.cli import CONFIGS, cli_error, run_cli


def to_legacy(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The old layout of a current state dict: each ConcatLinear back to one Linear over the
    concatenation in its old order, the gated/simple FNNs back to one Sequential."""
    state = dict(state)
    for name, module in model.named_modules():
        if not hasattr(module, "legacy_renames"):
            continue
        prefix = f"{name}." if name else ""
        for old, (new, order) in module.legacy_renames().items():
            if order is None:
                for part in ("weight", "bias"):
                    if f"{prefix}{new}.{part}" in state:
                        state[f"{prefix}{old}.{part}"] = state.pop(f"{prefix}{new}.{part}")
                continue
            w_x, w_u = state.pop(f"{prefix}{new}.state.weight"), state.pop(f"{prefix}{new}.input.weight")
            state[f"{prefix}{old}.weight"] = torch.cat([w_x, w_u] if order == "state_first" else [w_u, w_x], dim=1)
            if f"{prefix}{new}.input.bias" in state:
                state[f"{prefix}{old}.bias"] = state.pop(f"{prefix}{new}.input.bias")
    return state


@pytest.mark.parametrize("cfg", [
    dict(updater="residual", context_dim=12, num_layers=3, token_input_all_layers=True),
    dict(updater="residual", context_dim=12, num_layers=3, token_input_all_layers=False),
    dict(updater="gated", context_dim=12, num_layers=3, hidden_dim=10, stacking="sequential"),
    dict(updater="gated", context_dim=12, num_layers=2, hidden_dim=10, stacking="layerwise"),
    dict(updater="simple", context_dim=12, num_layers=3, hidden_dim=10),
])
def test_old_state_dicts_load_into_the_split_layers(cfg):
    torch.manual_seed(0)
    trained = build_context_updater(ContextConfig(**cfg), embed_dim=8)
    legacy = to_legacy(trained.state_dict(), trained)
    assert not any(".state." in k or ".input." in k for k in legacy)  # really the old layout
    if cfg["updater"] != "residual":
        assert any(k.startswith("fnn") for k in legacy)
    fresh = build_context_updater(ContextConfig(**cfg), embed_dim=8)
    assert upgrade_legacy_state_dict(legacy, fresh) > 0
    fresh.load_state_dict(legacy)
    c, e = torch.randn(5, 12), torch.randn(5, 8)
    torch.testing.assert_close(fresh.update_context_one_step(c, e), trained.update_context_one_step(c, e))
    # a current state dict passes through unchanged
    current = trained.state_dict()
    assert upgrade_legacy_state_dict(current, trained) == 0 and current.keys() == trained.state_dict().keys()


def test_old_token_block_loads():
    torch.manual_seed(0)
    block = TokenBlock([12, 10], embed_dim=6)
    legacy = to_legacy(block.state_dict(), block)
    fresh = TokenBlock([12, 10], embed_dim=6)
    upgrade_legacy_state_dict(legacy, fresh)
    fresh.load_state_dict(legacy)
    contexts, e = [torch.randn(3, 12), torch.randn(3, 10)], torch.randn(3, 6)
    torch.testing.assert_close(fresh(contexts, e), block(contexts, e))


@pytest.mark.slow
def test_old_phase1_checkpoint_loads_for_phase2_and_inference_but_does_not_resume(tmp_path, capsys):
    from cvfp_lightning.modules import Phase1FixedPoint
    from cvfp_lightning.modules.phase2 import load_phase1

    small = ["--data.init_args.num_samples", "12", "--data.init_args.max_seq_len", "64",
             "--model.init_args.context.context_dim", "16", "--model.init_args.context.num_layers", "2",
             "--model.init_args.embedding.embed_dim", "16", "--trainer.enable_progress_bar", "false",
             "--trainer.enable_model_summary", "false", "--trainer.max_epochs", "2", "--trainer.callbacks", "[]"]
    run_cli(["fit", "--config", str(CONFIGS / "phase1.yaml"), *small,
             "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")])
    [ckpt_path] = list((tmp_path / "logs").rglob("last.ckpt"))
    ckpt = torch.load(ckpt_path, weights_only=True)
    current = Phase1FixedPoint.load_from_checkpoint(ckpt_path, map_location="cpu")
    ckpt["state_dict"] = to_legacy(ckpt["state_dict"], current)
    legacy_path = tmp_path / "legacy.ckpt"
    torch.save(ckpt, legacy_path)
    assert "updater.linears.0.weight" in ckpt["state_dict"]
    from cvfp_lightning.models.legacy import is_legacy_state_dict

    assert is_legacy_state_dict(ckpt["state_dict"]) and not is_legacy_state_dict(current.state_dict())

    old = Phase1FixedPoint.load_from_checkpoint(legacy_path, map_location="cpu")
    for (name, a), (_, b) in zip(current.state_dict().items(), old.state_dict().items()):
        assert torch.equal(a, b), name
    _, updater, _ = load_phase1(legacy_path)
    c, e = torch.randn(4, 16), torch.randn(4, 16)
    torch.testing.assert_close(updater.update_context_one_step(c, e), current.updater.update_context_one_step(c, e))
    err = cli_error(["fit", "--config", str(CONFIGS / "phase1.yaml"), *small, "--trainer.max_epochs", "3",
                     "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), "--ckpt_path", str(legacy_path)],
                    capsys)
    assert "cannot resume training" in err and "start a new fit" in err

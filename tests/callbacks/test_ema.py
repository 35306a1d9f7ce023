"""EMAWeights: the EMA formula on the trained weights, frozen weights bit-identical, checkpoints
that reload through Phase 2's pairing check; Lightning's EMAWeightAveraging refused clearly."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint

from cvfp_lightning import CVFPUserError
from cvfp_lightning.callbacks import EMAWeights
from cvfp_lightning.modules import Phase2LM
from helpers.lm import phase1_checkpoint, text_data, trainer

V = 4096  # the bundled tokenizer
DECAY = 0.8


class WeightRecorder(L.Callback):
    """The trainable weights after every optimizer step (read before any averaging swaps them)."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad})


def _fit(tmp_path, corpus, averaging):
    ckpt = phase1_checkpoint(tmp_path / "p1" / "last.ckpt", V)
    torch.manual_seed(0)
    model = Phase2LM(vocab_size=V, phase1_checkpoint=str(ckpt), weight_tying=True, freeze_embedding=False, lr=3e-3)
    frozen = {n: t.clone() for n, t in model.state_dict().items() if n.startswith(("lm.updater.", "lm.context_"))}
    recorder = WeightRecorder()
    saver = ModelCheckpoint(dirpath=tmp_path / "p2", save_last=True, save_top_k=0)
    t = trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=2, enable_checkpointing=True,
                callbacks=[averaging, recorder, saver])
    t.fit(model, datamodule=text_data(corpus))
    return model, frozen, recorder.steps, tmp_path / "p2" / "last.ckpt"


def test_ema_of_the_trained_weights_with_the_frozen_block_exact(tmp_path, corpus):
    model, frozen, steps, last = _fit(tmp_path, corpus, EMAWeights(decay=DECAY))
    assert len(steps) == 6
    expected = dict(steps[0])  # the first update copies, then w_avg = decay * w_avg + (1 - decay) * w
    for step in steps[1:]:
        expected = {n: DECAY * expected[n] + (1 - DECAY) * w for n, w in step.items()}
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trained) == set(expected) and len(trained) > 0
    for name, value in expected.items():  # after fit the module holds the average
        torch.testing.assert_close(trained[name], value, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(value, steps[-1][name])  # ... which is not the last raw weight
    state = model.state_dict()
    for name, value in frozen.items():
        assert torch.equal(state[name], value), name

    checkpoint = torch.load(last, weights_only=True)
    for name, value in expected.items():
        torch.testing.assert_close(checkpoint["state_dict"][name], value, rtol=1e-5, atol=1e-6)
    reloaded = Phase2LM.load_from_checkpoint(last, weights_only=True)  # the pairing digest matches
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value), name


def test_lightnings_ema_moves_the_frozen_block_and_its_checkpoint_is_refused_clearly(tmp_path, corpus):
    _, frozen, _, last = _fit(tmp_path, corpus, EMAWeightAveraging(decay=DECAY))
    state = torch.load(last, weights_only=True)["state_dict"]
    assert any(not torch.equal(state[n], v) for n, v in frozen.items())  # why EMAWeights exists
    with pytest.raises(CVFPUserError, match="train Phase 2 with cvfp_lightning.callbacks.EMAWeights") as info:
        Phase2LM.load_from_checkpoint(last, weights_only=True)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"decay": 1.0}, "decay=1.0 is invalid"),
    ({"decay": 0}, "decay=0 is invalid"),
    ({"decay": "0.9"}, "decay='0.9' is invalid"),
    ({"update_every_n_steps": 0}, "update_every_n_steps=0 is invalid"),
])
def test_bad_ema_arguments_are_one_clear_error(kwargs, message):
    with pytest.raises(CVFPUserError, match=message):
        EMAWeights(**kwargs)

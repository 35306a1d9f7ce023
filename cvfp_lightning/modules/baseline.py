"""``BaselineLM``: an ordinary GRU / LSTM / Transformer language model to compare CVFP with.

Trained on the same data module, tokenizer and train/validation split as Phase 2, with
the same objective and metrics (:class:`~cvfp_lightning.modules.lm_base.NextTokenModule`:
``val/loss``, ``val/ppl``, ``val/acc``, ``val/bpb``). Batches are windows
(``data_layout = "windows"``): ``input_ids (B, T)`` and ``targets (B, T)`` of
``data.seq_len`` ids that never cross a sequence; the recurrent state starts at 0 in
every window. With ``data.sequences: samples`` and ``data.seq_len`` = ``data.max_seq_len``
every window is one whole sequence, the context Phase 2 sees too.

``match_params`` sizes the model: the width is chosen so that the trainable parameter
count is as close as possible to it (the Phase 2 model's count, printed at the start of
its training and written to its ``summary.json`` as ``trainable_params``).
"""

from __future__ import annotations

from typing import Literal

from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from cvfp_lightning.errors import check, check_positive
from cvfp_lightning.models.baselines import ARCHS, build_baseline, count_trainable, match_hidden_dim
from cvfp_lightning.modules.lm_base import NextTokenModule


class BaselineLM(NextTokenModule):
    """A baseline language model (see the module docstring).

    Args:
        vocab_size: number of ids (linked from ``data.vocab_size``).
        arch: ``gru`` | ``lstm`` | ``transformer``.
        match_params: target trainable parameter count; sets the width (``hidden_dim``
            is then ignored). None: use ``hidden_dim``.
        hidden_dim: width d when ``match_params`` is None.
        num_layers: recurrent layers or transformer layers.
        num_heads: transformer attention heads (widths are multiples of it).
        max_len: transformer positions (>= ``data.seq_len``).
        dropout: dropout between layers.
        lr: Adam learning rate.
        grad_clip: max gradient norm (0 disables).
        weight_decay: AdamW's decoupled weight decay of the weight matrices (0: Adam; see
            :func:`cvfp_lightning.optim.adam`).
    """

    data_layout = "windows"

    def __init__(self, vocab_size: int = 0, arch: Literal["gru", "lstm", "transformer"] = "gru",
                 match_params: int | None = None, hidden_dim: int = 128, num_layers: int = 1, num_heads: int = 4,
                 max_len: int = 512, dropout: float = 0.0, lr: float = 1e-3, grad_clip: float = 1.0,
                 weight_decay: float = 0.0):
        super().__init__()
        check(arch in ARCHS, f"model.arch={arch!r} is unknown: expected one of {', '.join(ARCHS)}.")
        check(isinstance(vocab_size, int) and vocab_size > 0,
              f"model.vocab_size={vocab_size!r} is invalid: expected a positive integer (the CLI links it from the data).")
        check(match_params is None or (isinstance(match_params, int) and match_params > 0),
              f"model.match_params={match_params!r} is invalid: expected a positive integer or null.")
        check(0.0 <= dropout < 1.0, f"model.dropout={dropout!r} is invalid: expected a value in [0, 1).")
        check_positive("model.lr", lr)
        check_positive("model.weight_decay", weight_decay, allow_zero=True)
        check_positive("model.grad_clip", grad_clip, allow_zero=True)
        self.save_hyperparameters()
        width = (match_hidden_dim(arch, vocab_size, match_params, num_layers, num_heads, max_len)
                 if match_params is not None else hidden_dim)
        self.hidden_dim = width
        self.net = build_baseline(arch, vocab_size, width, num_layers, num_heads, max_len, dropout)
        if match_params is not None:
            rank_zero_info(f"BaselineLM: {arch} of width {width}: {count_trainable(self.net):,} trainable parameters "
                           f"(target {match_params:,})")

    def forward(self, input_ids: Tensor) -> Tensor:
        """``(B, T) -> (B, T, V)`` logits."""
        return self.net(input_ids)

    def logits_targets(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, Tensor]:
        return self.net(batch["input_ids"]), batch["targets"]  # (B, T, V), (B, T)

    def summary_extra(self) -> dict:
        return {"arch": self.hparams.arch, "hidden_dim": self.hidden_dim, "match_params": self.hparams.match_params}

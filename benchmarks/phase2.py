"""Phase 2 training throughput against GRU and transformer baselines of matched size.

Same data (the bundled corpus, bundled tokenizer, per-sample sequences of 128), same run:
a Phase 1 context block of the demo's shape (``configs/phase1.yaml``: residual, 3 x 128,
embedding 128; untrained weights, the throughput does not depend on them) feeds
``Phase2LM``; ``BaselineLM`` (gru, transformer) is sized with ``match_params`` to Phase 2's
trainable parameter count. Each model trains ``--epochs`` epochs; the table reports
training tokens per second (first epoch dropped, median over epochs and ``--runs``).
Phase 2's contexts come from one sequential pass (the cache), timed separately.

    python benchmarks/phase2.py [--runs 3] [--epochs 3]
    python benchmarks/phase2.py --reference     # seconds per epoch on the seed's reference workload
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from report import write_report


def epoch_timer(times: list[float]):
    """A callback appending each training epoch's seconds (to its last batch) to ``times``."""
    import lightning as L

    class EpochTimer(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            self.t = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx + 1 == trainer.num_training_batches:
                times.append(time.perf_counter() - self.t)

    return EpochTimer()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--reference", action="store_true",
                        help="Phase 2 seconds per epoch on the seed's reference workload instead")
    args = parser.parse_args()
    if args.reference:
        return reference(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lightning as L
    import torch

    from cvfp_lightning.data import TextDataModule
    from cvfp_lightning.models.baselines import count_trainable
    from cvfp_lightning.modules import BaselineLM, Phase1Parallel, Phase2LM
    from cvfp_lightning.runtime import tune_cpu_allocator

    tune_cpu_allocator()  # off with CVFP_MALLOC_TUNING=0
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    tmp = Path(tempfile.mkdtemp())
    L.seed_everything(42, verbose=False)
    p1 = Phase1Parallel(vocab_size=4096, context={"updater": "residual", "context_dim": 128, "num_layers": 3,
                                                    "init_std": 0.3}, embedding={"embed_dim": 128})
    ckpt = tmp / "phase1.ckpt"
    torch.save({"state_dict": p1.state_dict(), "hyper_parameters": dict(p1.hparams), "epoch": 0}, ckpt)

    def data():
        return TextDataModule(sequences="samples", max_seq_len=128, chunk_size=1024, batch_size=8, seq_len=128)

    def fit(model) -> tuple[list[float], int]:
        times: list[float] = []

        dm = data()
        trainer = L.Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, callbacks=[epoch_timer(times)], default_root_dir=tmp)
        trainer.fit(model, dm)
        return times, dm.train_sequences.num_tokens

    rows: dict[str, list[float]] = {"phase2": [], "gru": [], "transformer": []}
    params: dict[str, int] = {}
    context_s: list[float] = []
    for _ in range(args.runs):
        model = Phase2LM(vocab_size=4096, phase1_checkpoint=str(ckpt), cache="off")
        times, tokens = fit(model)
        params["phase2"] = count_trainable(model)
        context_s.append(model.context_seconds)
        rows["phase2"] += [tokens / t for t in times[1:]]
        for arch in ("gru", "transformer"):
            base = BaselineLM(vocab_size=4096, arch=arch, match_params=params["phase2"])
            times, tokens = fit(base)
            params[arch] = count_trainable(base)
            rows[arch] += [tokens / t for t in times[1:]]
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
              "train_tokens": tokens, "trainable_params": params, "phase2_context_pass_s": statistics.median(context_s),
              "tokens_per_s_median": {k: statistics.median(v) for k, v in rows.items()}, "samples": rows}
    for k, v in report["tokens_per_s_median"].items():
        print(f"{k:12s} {params[k]:>9d} trainable params  {v:10.0f} train tokens/s")
    print(f"Phase 2 contexts (one sequential pass over train+val): {report['phase2_context_pass_s']:.2f}s")
    write_report("phase2", report)


def reference(args) -> None:
    """Phase 2 on the seed's reference workload (DESIGN.md "Reference figures": 14-34 s an epoch).

    6400 + 1280 synthetic ids from 50257, the seed code's default Phase 1 block (residual,
    6 x 768, ``token_input_all_layers: false``) and its frozen 768-dim embedding, an untied
    50257-way head; batches of 1600 positions. Seconds per training epoch (after the first)
    and the one-off context pass.
    """
    import lightning as L
    import torch

    from cvfp_lightning.data import SyntheticTokensDataModule
    from cvfp_lightning.models.baselines import count_trainable
    from cvfp_lightning.modules import Phase1Parallel, Phase2LM
    from cvfp_lightning.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    tmp = Path(tempfile.mkdtemp())
    epochs: list[float] = []
    context_s: list[float] = []
    for run in range(args.runs):
        L.seed_everything(42, verbose=False)
        p1 = Phase1Parallel(vocab_size=50257, context={"updater": "residual", "context_dim": 768, "num_layers": 6,
                                                         "token_input_all_layers": False},
                              embedding={"embed_dim": 768, "freeze": True})
        ckpt = tmp / "phase1.ckpt"
        torch.save({"state_dict": p1.state_dict(), "hyper_parameters": dict(p1.hparams), "epoch": 0}, ckpt)
        model = Phase2LM(vocab_size=50257, phase1_checkpoint=str(ckpt), cache="off")
        times: list[float] = []

        dm = SyntheticTokensDataModule(vocab_size=50257, num_tokens=6400, val_tokens=1280, seed=42, chunk_size=1600)
        trainer = L.Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0, callbacks=[epoch_timer(times)], default_root_dir=tmp)
        trainer.fit(model, dm)
        epochs += times[1:]
        context_s.append(model.context_seconds)
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "loadavg": os.getloadavg(),
              "workload": "reference", "trainable_params": count_trainable(model),
              "epoch_s_median": statistics.median(epochs), "epoch_s": epochs,
              "context_pass_s_median": statistics.median(context_s), "seed_epoch_s": [14, 34]}
    print(f"Phase 2 on the reference workload: {report['epoch_s_median']:.2f} s per epoch (seed 14-34 s), "
          f"context pass {report['context_pass_s_median']:.2f} s, {report['trainable_params']:,} trainable params")
    write_report("phase2_reference", report)


if __name__ == "__main__":
    main()

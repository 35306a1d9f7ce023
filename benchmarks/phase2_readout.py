"""What the frozen CVFP contexts give the Phase 2 readout: the recipe with and without its contexts.

For each corpus (``quality.py``'s splits) one recipe Phase 1 (``configs/text_phase1.yaml``), then
``configs/text_phase2.yaml`` on it for every ``--histories`` K (``model.token_history``), once as it
is and once as :class:`WithoutContexts`, the same module whose token block reads zeros in place of
the contexts (then the model sees the token and its K ids before only: a neural (K+2)-gram).
Everything else is the recipe's: tokenizer, embedding, token block, tied head, optimiser, EMA,
early stopping; both rows without the recipe's continuous cache (it reads text, not the contexts). Scores: validation bpb of the best checkpoint and the test split's bpb from the
fit's ``summary.json`` (the best weights on the test files, as ``cvfp evaluate`` scores them).
Writes ``results/phase2_readout_<date>.json``.

    python benchmarks/phase2_readout.py --corpora licenses bundled --histories 0 1
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from torch import Tensor

from cvfp_lightning.modules import Phase2LM
from report import write_report


class WithoutContexts(Phase2LM):
    """``Phase2LM`` whose token block reads zeros in place of every context layer (an ablation)."""

    def logits_targets(self, batch: dict[str, Tensor], split: str) -> tuple[Tensor, Tensor]:
        ids = batch["ids"]
        zeros = [torch.zeros(ids.shape[0], d, device=self.device) for d in self.lm.updater.layer_dims]
        logits = self.lm.logits(zeros, self.lm.embedding(ids), self.lm.history_embeds(batch.get("history")))
        return logits, batch["targets"]  # (n, V), (n,)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpora", nargs="+", default=["licenses", "bundled"], choices=["licenses", "bundled"])
    parser.add_argument("--histories", nargs="+", type=int, default=[0, 1], help="model.token_history values")
    parser.add_argument("--work_dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cvfp_readout")
    args = parser.parse_args()
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("CVFP_CACHE_DIR", str(args.work_dir / "cache"))
    import quality

    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "histories": args.histories,
              "corpora": {}}
    for corpus in args.corpora:
        work = args.work_dir / corpus
        files = quality.write_splits(corpus, work / "text")
        data = quality.data_args(files)
        phase1 = quality.fit_run("recipe_phase1", quality.CONFIGS / "text_phase1.yaml", data, work / "logs")
        rows = {}
        for k in args.histories:
            for contexts in (True, False):
                name = f"history{k}_{'contexts' if contexts else 'no_contexts'}"
                extra = ["--model.init_args.phase1_checkpoint", phase1["best"], "--model.init_args.token_history", str(k),
                         "--model.init_args.continuous_cache", "null"]  # the readout alone (the ablation reads no cache)
                if not contexts:
                    extra = ["--model.class_path", "phase2_readout.WithoutContexts", *extra]  # this file's class
                run = quality.fit_run(name, quality.CONFIGS / "text_phase2.yaml", data + extra, work / "logs")
                s = run["summary"]
                rows[name] = {"token_history": k, "contexts": contexts, "val_bpb": s.get("val/bpb"),
                              "test_bpb": s.get("test/bpb"), "best_epoch": s.get("best_epoch"),
                              "epochs": s.get("epochs_run"), "trainable_params": s.get("trainable_params"),
                              "seconds": run["seconds"]}
                print(json.dumps({"corpus": corpus, "row": name, **rows[name]}), flush=True)
        report["corpora"][corpus] = {"phase1": phase1["best"], "rows": rows}
    write_report("phase2_readout", report)


if __name__ == "__main__":
    main()

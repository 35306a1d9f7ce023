"""Validation bpb of exported CVFP models over a grid of continuous-cache settings.

How ``configs/text_phase2.yaml``'s ``continuous_cache`` was chosen: for each ``--model``
(a ``cvfp export`` folder or a Phase 2 checkpoint) and its ``--text`` file (the validation
split), the token-block outputs ``t_i`` and logits of every position are computed once
(contexts of one sequential pass, as ``cvfp evaluate``), then each setting's bits per byte
by :meth:`ContinuousCache.log_probs` over chunks of 512 positions, the memory the ``size``
positions before each one in the file's order: the numbers ``cvfp evaluate
--continuous_cache.*`` gives, without recomputing the model per setting. Writes
``results/continuous_cache_grid_<date>.json``; the best settings by the mean of each model's
bpb relative to its bpb without a cache.

    python benchmarks/continuous_cache_grid.py --model exports/licences exports/bundled \\
        --text val_licences.txt val_bundled.txt --sizes 512 1024 2048 4096 --thetas 5 7 10 14 20 --weights 0.3 0.4 0.5
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
from pathlib import Path

import torch

from report import write_report


@torch.no_grad()
def features_of(model, text: Path) -> dict:
    """``t (N, E)``, ``logits (N, V)``, ``next (N,)`` (-100: none) of every position of ``text``, and its bytes."""
    from cvfp_lightning.context_cache import final_contexts
    from cvfp_lightning.evaluate import evaluation_data

    data = evaluation_data(model, [text])
    data.setup()
    seqs = data.val_sequences
    contexts = final_contexts(*model.context_modules(), {"test": seqs}, 256)
    keys, logits, nexts = [], [], []
    for start in range(0, seqs.num_tokens, 512):
        batch = seqs.position_batch(torch.arange(start, min(start + 512, seqs.num_tokens)), model.token_history)
        previous = contexts.previous("test", batch["positions"], batch["is_start"])
        t = model.step_features(previous, batch["ids"], batch.get("history"))[1]
        keys.append(t), logits.append(model.head(t)), nexts.append(batch["targets"])
    return {"keys": torch.cat(keys), "logits": torch.cat(logits), "next": torch.cat(nexts), "bytes": seqs.num_bytes}


@torch.no_grad()
def bpb(feats: dict, cache) -> float:
    """Bits per byte of the positions with a next id, read with ``cache`` (None: the model alone).

    ``feats``: ``keys (N, E)``, ``logits (N, V)``, ``next (N,)`` (-100: none) of a text's positions in
    order and its ``bytes`` (:func:`features_of`, or any model's outputs: ``quality.recurrent_with_cache``)."""
    from cvfp_lightning.models.continuous_cache import ContinuousCache

    cache = cache or ContinuousCache(weight=0.0)
    keys, logits, nexts = feats["keys"], feats["logits"], feats["next"]
    positions, nll = torch.arange(len(nexts)), 0.0
    for a in range(0, len(nexts), 512):
        b, lo = min(len(nexts), a + 512), max(0, a - cache.size)
        log_p = cache.log_probs(logits[a:b], keys[a:b], positions[a:b], keys[lo:b], nexts[lo:b], positions[lo:b])
        known = nexts[a:b] >= 0
        nll -= float(log_p[known].gather(1, nexts[a:b][known].reshape(-1, 1)).sum())
    return nll / (math.log(2) * feats["bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", required=True, help="exported folders or Phase 2 checkpoints")
    parser.add_argument("--text", nargs="+", required=True, type=Path, help="one validation file per model")
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    parser.add_argument("--thetas", nargs="+", type=float, default=[5, 7, 10, 14, 20])
    parser.add_argument("--weights", nargs="+", type=float, default=[0.3, 0.4, 0.5])
    args = parser.parse_args()
    if len(args.model) != len(args.text):
        parser.error("give one --text file per --model")
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    from cvfp_lightning.export import load_model
    from cvfp_lightning.models.continuous_cache import ContinuousCache

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    models, feats = {}, {}
    for name, text in zip(args.model, args.text):
        feats[name] = features_of(load_model(name), text)
        models[name] = {"text": str(text), "tokens": int((feats[name]["next"] >= 0).sum()),
                        "bytes": feats[name]["bytes"], "no_cache": bpb(feats[name], None), "grid": []}
    for size, theta, weight in itertools.product(args.sizes, args.thetas, args.weights):
        cache = ContinuousCache(size=size, theta=float(theta), weight=float(weight))
        for name, record in models.items():
            record["grid"].append({**cache.to_dict(), "bpb": bpb(feats[name], cache)})
        print(cache.to_dict(), [round(r["grid"][-1]["bpb"], 4) for r in models.values()], flush=True)
    mean_ratio = [sum(r["grid"][i]["bpb"] / r["no_cache"] for r in models.values()) / len(models)
                  for i in range(len(next(iter(models.values()))["grid"]))]
    best = min(range(len(mean_ratio)), key=mean_ratio.__getitem__)
    first = next(iter(models.values()))["grid"][best]
    report = {"models": models, "best": {k: first[k] for k in ("size", "theta", "weight")},
              "best_mean_ratio": mean_ratio[best],
              "best_bpb": {name: r["grid"][best]["bpb"] for name, r in models.items()}}
    write_report("continuous_cache_grid", report)
    print(report["best"], report["best_bpb"])


if __name__ == "__main__":
    main()

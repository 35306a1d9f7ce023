"""What crosses ranks in a DDP Phase 1 run, per iteration: bytes by collective, counted on every rank.

Runs Phase 1 (the configuration of ``benchmarks/scale.py``: synthetic ids, ``samples`` of
512, iteration 0 + ``--epochs`` parallel iterations, validation every iteration, its
callbacks: effective rank, diagnostics, context cache hand-off) under
``ddp`` on ``--devices`` CPU processes (gloo) for each of ``--sizes``, with the callback
:class:`CommCounter` of this file in the trainer. The callback wraps the
``torch.distributed`` collectives (``all_reduce``, ``all_gather``, ``broadcast``,
``broadcast_object_list``, ...) and registers a DDP communication hook, so the gradient
buckets DDP all-reduces are counted too; every call adds the bytes this rank contributes
(the tensor it sends; pickled size for object collectives) to the current segment:

* ``fit start``: iteration 0 (the sharded sequential pass), statistics, setup;
* ``iteration k``: from the start of training iteration k to the start of the next one
  (its chunks, the gradient all-reduce, the statistics, validation, metric syncs, the
  checkpoint's digests);
* ``fit end``: after the last iteration (the diagnostics and the context cache hand-off).

Bytes per iteration that do not change with the size are the goal (O(D^2 + model), not
O(N D)). Writes ``benchmarks/results/comm_<date>.json`` and prints a table.

    python benchmarks/comm.py --demo --sizes 16384,65536
    python benchmarks/comm.py --sizes 8192,24576 --token_input_all_layers false --vocab_size 8192
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch

HERE = Path(__file__).resolve().parent

_COUNTS: dict = {"segment": "setup", "label": None, "bytes": defaultdict(lambda: defaultdict(int)),
                 "calls": defaultdict(lambda: defaultdict(int))}


def _nbytes(t) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _add(op: str, nbytes: int) -> None:
    op = _COUNTS["label"] or op  # DDP's gradient buckets go through all_reduce too: counted once, by name
    _COUNTS["bytes"][_COUNTS["segment"]][op] += int(nbytes)
    _COUNTS["calls"][_COUNTS["segment"]][op] += 1


def _install() -> None:
    """Wrap the collectives of ``torch.distributed`` (once per process) and DDP's gradient buckets."""
    dist = torch.distributed
    if getattr(dist, "_cvfp_counted", False):
        return
    dist._cvfp_counted = True

    def tensor_op(name: str, arg: int):  # the argument this rank sends
        original = getattr(dist, name)

        def wrapped(*args, **kwargs):
            sent = args[arg] if len(args) > arg else kwargs.get({0: "tensor", 1: "tensor"}.get(arg, "tensor"))
            if name in ("all_gather", "all_gather_into_tensor", "gather", "reduce_scatter"):
                sent = args[1] if len(args) > 1 else kwargs.get("input_tensor", kwargs.get("tensor"))
            _add(name, _nbytes(sent))
            return original(*args, **kwargs)

        setattr(dist, name, wrapped)

    for name in ("all_reduce", "broadcast", "reduce"):
        tensor_op(name, 0)
    for name in ("all_gather", "all_gather_into_tensor", "gather", "reduce_scatter"):
        tensor_op(name, 1)

    def object_op(name: str):
        original = getattr(dist, name)

        def wrapped(*args, **kwargs):
            obj = args[0] if args else None
            if name == "all_gather_object":
                obj = args[1] if len(args) > 1 else kwargs.get("obj")
            try:
                _add(name, len(pickle.dumps(obj)))
            except Exception:  # noqa: BLE001 - counting must never break the run
                _add(name, 0)
            return original(*args, **kwargs)

        setattr(dist, name, wrapped)

    for name in ("broadcast_object_list", "all_gather_object"):
        object_op(name)
    barrier = dist.barrier

    def counted_barrier(*args, **kwargs):
        _add("barrier", 0)
        return barrier(*args, **kwargs)

    dist.barrier = counted_barrier

    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    init = DistributedDataParallel.__init__

    def ddp_init(self, *args, **kwargs):
        init(self, *args, **kwargs)

        def hook(state, bucket):
            _COUNTS["label"] = "ddp_gradient_buckets"
            try:
                return allreduce_hook(state, bucket)
            finally:
                _COUNTS["label"] = None

        self.register_comm_hook(None, hook)

    DistributedDataParallel.__init__ = ddp_init


class CommCounter(L.Callback):
    """Counts the bytes this rank sends through collectives, per segment; writes them to ``out`` + rank at the end."""

    def __init__(self, out: str = "comm"):
        self.out = out
        _install()

    def on_fit_start(self, trainer, pl_module) -> None:
        _COUNTS["segment"] = "fit start"

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        _COUNTS["segment"] = f"iteration {trainer.current_epoch + 1}"

    def on_train_end(self, trainer, pl_module) -> None:
        _COUNTS["segment"] = "fit end"

    def teardown(self, trainer, pl_module, stage: str) -> None:
        Path(f"{self.out}.rank{trainer.global_rank}.json").write_text(json.dumps(
            {"bytes": _COUNTS["bytes"], "calls": _COUNTS["calls"]}, indent=1))


def main() -> None:
    sys.path.insert(0, str(HERE))
    import scale

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16384,65536")
    parser.add_argument("--val_tokens", type=int, default=4096)
    parser.add_argument("--dims", type=int, default=768)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--token_input_all_layers", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    parser.add_argument("--demo", action="store_true", help="128 dims, 3 layers, init_std 0.3")
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--phase1_chunk", type=int, default=4096)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--context_dtype", default=None)
    parser.add_argument("--context_store", default=None)
    parser.add_argument("--phase1_class", default="cvfp_lightning.modules.Phase1Parallel")
    parser.add_argument("--pythonpath", default=str(HERE.parent))
    args = parser.parse_args()
    if args.demo:
        args.dims, args.layers = 128, 3
    work = Path(tempfile.mkdtemp(prefix="cvfp_comm_"))
    env = {**os.environ, "PYTHONPATH": f"{args.pythonpath}{os.pathsep}{HERE}", "CVFP_CACHE_DIR": str(work / "cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "JSONARGPARSE_DEPRECATION_WARNINGS": "off",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    report = {"args": vars(args), "runs": []}
    for size in (int(s) for s in args.sizes.split(",")):
        folder = work / f"size_{size}"
        folder.mkdir()
        config = scale.phase1_config(args, size)
        config["trainer"]["max_epochs"] = args.epochs
        config["trainer"]["callbacks"].append({"class_path": "comm.CommCounter",
                                               "init_args": {"out": str(folder / "comm")}})
        path = scale.write_yaml(config, folder / "phase1.yaml")
        with open(folder / "phase1.log", "w") as log:
            rc = subprocess.call([*scale.cvfp_command(), "fit", "--config", str(path)], cwd=folder, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        if rc:
            print((folder / "phase1.log").read_text()[-3000:], file=sys.stderr)
            sys.exit(f"Phase 1 at {size} failed (rc {rc})")
        ranks = [json.loads((folder / f"comm.rank{r}.json").read_text()) for r in range(args.devices)]
        report["runs"].append({"size": size, "ranks": ranks})
        print(f"N = {size:,d} training positions (+ {args.val_tokens} validation), {args.devices} processes:")
        for segment, ops in ranks[0]["bytes"].items():
            total = [sum(r["bytes"].get(segment, {}).values()) for r in ranks]
            detail = ", ".join(f"{op} {b:,d} B / {ranks[0]['calls'][segment][op]} calls" for op, b in sorted(ops.items()))
            print(f"  {segment:12s} sent per rank {' / '.join(f'{t:,d}' for t in total)} B  ({detail})")
    from report import write_report

    write_report("comm", report)


if __name__ == "__main__":
    main()

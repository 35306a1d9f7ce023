"""Sequential passes over token sequences (Phase 1 iteration 0, caches, evaluation).

``sequential_pass`` runs ``c_t = f(c_{t-1}, e_t)`` from ``c = 0`` over every sequence of a
:class:`~cvfp_lightning.data.sequences.TokenSequences`, many sequences at once: sequences
are sorted by length and processed ``batch_size`` at a time, so per-sample data gets one
update call per time step for the whole batch (the only per-token Python overhead), and a
sequence that has ended leaves the batch (no step is computed for padding). The
token's share of every Linear (``W_e e + b``) is computed for a block of steps in one
matrix product (:meth:`ContextUpdater.token_terms`), so each step multiplies only the
context: half the weight reads of the memory-bound step. Progress (tokens done / total,
tokens/s, ETA) goes through :func:`cvfp_lightning.progress.task`, after every block.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from cvfp_lightning.data.sequences import TokenSequences
from cvfp_lightning.models.context import ContextUpdater, unroll
from cvfp_lightning.models.embedding import TokenEmbedding
from cvfp_lightning.progress import task

MAX_BLOCK = 512  # time steps embedded at once
BLOCK_FLOATS = 1 << 24  # bound on the floats of one block's precomputed token terms (64 MB)


Sink = Callable[[int, Tensor], None]


@torch.no_grad()
def sequential_pass(updater: ContextUpdater, embedding: TokenEmbedding, seqs: TokenSequences,
                    batch_size: int = 256, return_all_layers: bool = False, rank: int = 0, world_size: int = 1,
                    out_dtype: torch.dtype = torch.float32, sink: Sink | None = None,
                    initial: Tensor | None = None,
                    description: str = "sequential pass") -> Tensor | tuple[Tensor, list[Tensor]] | None:
    """Contexts of every position, ``(N, D)`` (and every layer's, ``[(N, d_l)]``).

    Only sequences ``s`` with ``s % world_size == rank`` are computed; the other rows stay
    zero, so summing the results of all ranks gives the full pass. ``description`` names the
    pass in its progress (rank 0 counts its own tokens).

    With ``sink`` nothing of size N is allocated: every block of contexts is handed to
    ``sink(first_position, contexts (k, D))`` as soon as it is computed (consecutive
    positions of one sequence; the last layer only) and the pass returns None. ``initial``
    ``(D,)``: the context sequence 0 starts from (the last context of the rank before, for a
    shard that continues a stream) instead of 0.
    """
    device = next(updater.parameters()).device
    N = seqs.num_tokens
    out = None
    if sink is None:
        out = torch.zeros(N, updater.context_dim, dtype=out_dtype, device=device)
    layers_out = [torch.zeros(N, d, dtype=out_dtype, device=device) for d in updater.layer_dims] \
        if return_all_layers else []
    lengths = seqs.lengths
    mine = torch.arange(seqs.num_sequences)
    mine = mine[(mine % world_size == rank) & (lengths[mine] > 0)]
    order = mine[torch.argsort(lengths[mine], descending=True, stable=True)]
    with task(description, total=int(lengths[order].sum()), unit="tokens") as bar:
        for b in range(0, len(order), batch_size):
            group = order[b:b + batch_size]  # lengths descending: the rows still running are a prefix
            ids, lens = seqs.padded(group)
            ids = ids.to(device)
            B, T = ids.shape
            starts = seqs.offsets[group].to(device)
            context = torch.zeros(B, updater.context_dim, device=device)
            if initial is not None:
                context[group == 0] = initial.to(device=device, dtype=context.dtype)
            block = max(1, min(MAX_BLOCK, BLOCK_FLOATS // max(1, B * updater.token_terms_width())))
            t0 = 0
            while t0 < T:
                rows = int((lens > t0).sum())  # sequences longer than t0
                t1 = min(t0 + block, int(lens[rows - 1]))  # no row of the block ends before t1
                embeds = embedding(ids[:rows, t0:t1])  # (rows, t1-t0, E)
                if return_all_layers:
                    steps, layer_steps = unroll(updater, embeds, context[:rows], return_all_layers=True)
                else:
                    steps, layer_steps = unroll(updater, embeds, context[:rows]), []
                context = steps[:, -1]
                if sink is not None:
                    for row in range(rows):
                        sink(int(starts[row]) + t0, steps[row])
                else:
                    idx = (starts[:rows].unsqueeze(1) + torch.arange(t0, t1, device=device)).reshape(-1)
                    out[idx] = steps.reshape(-1, steps.shape[-1]).to(out_dtype)
                    for layer_block, layer_buf in zip(layer_steps, layers_out):
                        layer_buf[idx] = layer_block.reshape(-1, layer_block.shape[-1]).to(out_dtype)
                bar.advance(rows * (t1 - t0))
                t0 = t1
    if sink is not None:
        return None
    return (out, layers_out) if return_all_layers else out


def sharded_sequential_pass(updater: ContextUpdater, embedding: TokenEmbedding, parts: list,
                            sinks: list[Sink], batch_size: int = 256,
                            broadcast: Callable[[Tensor, int], Tensor] | None = None,
                            description: str = "sequential pass") -> None:
    """This rank's contexts of one or more splits, each handed to its ``sink(local_position, rows)``.

    ``parts``: ``[(shard, view), ...]`` from :func:`~cvfp_lightning.data.shards.shard_view`,
    one per split; positions given to ``sinks[k]`` are local to ``view``. Splits of whole
    sequences run together in one batched pass (no communication). A single stream cut over
    W ranks is a chain: rank r computes its piece from the last context of rank r - 1,
    handed over with ``broadcast(row (D,), src)`` (W rows of D in all); the ranks wait for
    one another, so this costs the time of one process and holds only a shard per rank.
    Nothing of size N is allocated.
    """
    device = next(updater.parameters()).device
    whole = [k for k, (shard, _) in enumerate(parts) if not shard.chained]
    if whole:
        views = [parts[k][1] for k in whole]
        starts = [0]
        for v in views:
            starts.append(starts[-1] + v.num_tokens)

        def route(first: int, rows: Tensor) -> None:  # a block never crosses a sequence, so never a split
            k = max(i for i in range(len(views)) if starts[i] <= first)
            sinks[whole[k]](first - starts[k], rows)

        sequential_pass(updater, embedding, TokenSequences.concat(views), batch_size, sink=route,
                        description=description)
    for k, (shard, view) in enumerate(parts):
        if k in whole:
            continue
        carried = torch.zeros(updater.context_dim, device=device)
        for r in range(shard.world_size):
            if r == shard.rank and view.num_tokens:
                last: dict[str, Tensor] = {}

                def keep(first: int, rows: Tensor, sink=sinks[k], n=view.num_tokens, last=last) -> None:
                    sink(first, rows)
                    if first + rows.shape[0] == n:
                        last["row"] = rows[-1]

                sequential_pass(updater, embedding, view, batch_size, sink=keep,
                                initial=carried if shard.continues else None, description=description)
                carried = last["row"]
            carried = broadcast(carried, r) if broadcast is not None else carried


def shifted_inputs(contexts: Tensor, positions: Tensor, is_start: Tensor,
                   initial: Tensor | None = None) -> Tensor:
    """The one-token shift: input context of position i is ``contexts[i - 1]``.

    ``contexts (N, D)``, ``positions (n,)``, ``is_start (n,)`` -> ``(n, D)``; a position that
    starts a sequence gets ``initial`` (zeros by default) instead.
    """
    prev_idx = (positions - 1).clamp_min(0)
    shifted = contexts[prev_idx]
    start_value = shifted.new_zeros(()) if initial is None else initial.to(shifted.dtype)
    return torch.where(is_start.unsqueeze(-1), start_value, shifted)

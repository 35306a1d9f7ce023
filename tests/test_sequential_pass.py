"""The sequential pass (cvfp_lightning.sequential_pass): the one-token shift, the pass against unroll,
batched and sharded, and no update computed for padding."""

from __future__ import annotations

import torch

from cvfp_lightning.data.sequences import TokenSequences
from cvfp_lightning.models import ContextConfig, build_context_updater, build_embedding, unroll
from cvfp_lightning.sequential_pass import sequential_pass, shifted_inputs


def test_one_token_shift_and_sequence_starts():
    seqs = TokenSequences.from_lists([[5, 6, 7], [8, 9]])
    assert seqs.is_start().tolist() == [True, False, False, True, False]
    assert seqs.targets().tolist() == [6, 7, -100, 9, -100]
    contexts = torch.arange(5.0).unsqueeze(-1).repeat(1, 2)  # row i = (i, i)
    pos = torch.tensor([0, 1, 2, 3, 4])
    inp = shifted_inputs(contexts, pos, seqs.is_start()[pos])
    assert inp[:, 0].tolist() == [0.0, 0.0, 1.0, 0.0, 3.0]  # start -> 0, else contexts[i - 1]


def test_sequential_pass_matches_unroll_and_batches_sequences():
    torch.manual_seed(0)
    upd = build_context_updater(ContextConfig(context_dim=8, num_layers=2), 8)
    emb = build_embedding(20, {"embed_dim": 8}, 8)
    seqs = TokenSequences.from_lists([[1, 2, 3, 4], [5, 6], [7, 8, 9]])
    ctx = sequential_pass(upd, emb, seqs, batch_size=2)
    for s in range(3):
        ids = seqs.sequence(s)
        ref = unroll(upd, emb(ids).unsqueeze(0))[0]
        torch.testing.assert_close(ctx[seqs.offsets[s]:seqs.offsets[s + 1]], ref)
    # two "ranks" together give the whole pass
    parts = sum(sequential_pass(upd, emb, seqs, batch_size=2, rank=r, world_size=2) for r in range(2))
    torch.testing.assert_close(parts, ctx)
    ctx_all, layers = sequential_pass(upd, emb, seqs, return_all_layers=True)
    torch.testing.assert_close(layers[-1], ctx_all)


def test_sequential_pass_computes_no_padding_steps(monkeypatch):
    """Sequences of many lengths (and an empty one), small blocks: every position is computed
    once, from its own sequence's history, and ended sequences leave the batch."""
    import cvfp_lightning.sequential_pass as passes

    torch.manual_seed(0)
    upd = build_context_updater(ContextConfig(context_dim=8, num_layers=2), 8)
    emb = build_embedding(30, {"embed_dim": 8}, 8)
    lists = [[1, 2, 3, 4, 5, 6, 7], [], [8, 9], [10, 11, 12, 13, 14], [15], [16, 17, 18, 19, 20, 21, 22, 23, 24]]
    seqs = TokenSequences.from_lists(lists)
    rows = []
    step = type(upd).update_context_one_step

    def counting_step(self, context, *args, **kwargs):
        rows.append(context.shape[0])
        return step(self, context, *args, **kwargs)

    monkeypatch.setattr(passes, "MAX_BLOCK", 3)
    monkeypatch.setattr(type(upd), "update_context_one_step", counting_step)
    ctx, layers = sequential_pass(upd, emb, seqs, batch_size=4, return_all_layers=True)
    assert sum(rows) == seqs.num_tokens  # one update per real position, none for padding
    monkeypatch.undo()
    for s, ids in enumerate(lists):
        if ids:
            ref, ref_layers = unroll(upd, emb(torch.tensor([ids])), return_all_layers=True)
            a, b = int(seqs.offsets[s]), int(seqs.offsets[s + 1])
            torch.testing.assert_close(ctx[a:b], ref[0])
            for got, want in zip(layers, ref_layers):
                torch.testing.assert_close(got[a:b], want[0])

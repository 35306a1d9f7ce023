"""The Phase 1 -> Phase 2 context cache: fingerprint, stale and tampered caches, the hand-off
callback, and Phase 2 from a cache = Phase 2 from recomputation."""

from __future__ import annotations

import copy

import pytest
import torch

from cvfp_lightning import CVFPUserError
from cvfp_lightning.context_cache import (
    META,
    ContextCache,
    ContextSource,
    cache_components,
    contexts_config,
    final_contexts,
    fingerprint,
    resolve_contexts,
)
from cvfp_lightning.callbacks import ContextCacheHandoff
from cvfp_lightning.data import TokenSequences
from cvfp_lightning.models import build_context_updater, build_embedding
from cvfp_lightning.modules import Phase1FixedPoint, Phase2LM
from cvfp_lightning.sequential_pass import sequential_pass
from helpers.lm import SMALL_CONTEXT, phase1_checkpoint, text_data, trainer

V = 4096


class FakeData:
    """What the cache reads from a data module."""

    def __init__(self, train: list[list[int]], val: list[list[int]], key: str = "source-a",
                 test: list[list[int]] | None = None):
        self.train_sequences, self.val_sequences = TokenSequences.from_lists(train), TokenSequences.from_lists(val)
        self.test_sequences = TokenSequences.from_lists(test) if test is not None else None
        self.tokenizer, self._key = None, key

    def cache_key(self) -> str:
        return self._key


class OneProcess:
    """The trainer side a cache write uses, for one process."""

    global_rank, world_size = 0, 1

    class strategy:  # noqa: N801 - stands in for the trainer's strategy
        @staticmethod
        def broadcast(obj, src=0):
            return obj

        @staticmethod
        def barrier(name=None):
            return None


def parts(seed: int = 0, vocab: int = 40):
    torch.manual_seed(seed)
    emb = build_embedding(vocab, {"embed_dim": 8}, default_dim=8)
    upd = build_context_updater({"context_dim": 8, "num_layers": 2}, 8)
    return emb, upd, contexts_config(vocab, {"context_dim": 8, "num_layers": 2}, {"embed_dim": 8})


DATA = ([[1, 2, 3, 4], [5, 6, 7]], [[8, 9, 10]])
HP = {"vocab_size": 40, "context": {"context_dim": 8, "num_layers": 2}, "embedding": {"embed_dim": 8}}


def test_fingerprint_changes_with_weights_data_tokenizer_and_config():
    emb, upd, cfg = parts()
    base = cache_components(emb, upd, FakeData(*DATA), cfg)
    assert cache_components(emb, upd, FakeData(*DATA), cfg) == base  # deterministic
    assert base["test_tokens"] == "none"  # no test split
    changed_weight = copy.deepcopy(upd)
    with torch.no_grad():
        changed_weight.linears[0].state.weight[0, 0] += 1e-6
    variants = {
        "phase1_weights": cache_components(emb, changed_weight, FakeData(*DATA), cfg),
        "train_tokens": cache_components(emb, upd, FakeData([[1, 2, 3, 4], [5, 6, 8]], DATA[1]), cfg),
        "val_tokens": cache_components(emb, upd, FakeData(DATA[0], [[8, 9], [10]]), cfg),
        "test_tokens": cache_components(emb, upd, FakeData(*DATA, test=[[11, 12]]), cfg),
        "data_source": cache_components(emb, upd, FakeData(*DATA, key="source-b"), cfg),
        "config": cache_components(emb, upd, FakeData(*DATA), {**cfg, "vocab_size": 41}),
    }
    for component, comps in variants.items():
        assert fingerprint(comps) != fingerprint(base), component
        assert [k for k in base if comps[k] != base[k]] == [component]
    # options that only change initialisation or training do not invalidate the cache
    assert contexts_config(40, {"context_dim": 8, "init_std": 0.5}, {"freeze": False}) == \
        contexts_config(40, {"context_dim": 8, "init_std": 0.1}, {"freeze": True})


@pytest.mark.parametrize("dtype, tolerance", [("float32", 1e-6), ("bfloat16", 1e-2)])  # fp32: batched with the other splits
def test_cache_holds_the_final_contexts_of_the_sequential_pass_and_round_trips(tmp_path, dtype, tolerance):
    emb, upd, _ = parts()
    data = FakeData(*DATA, test=[[11, 12, 13]])
    source = ContextSource(emb, upd, data, HP)
    cache = source.write(tmp_path / "context_cache", OneProcess(), dtype=dtype)
    assert sorted(p.name for p in (tmp_path / "context_cache").iterdir()) == \
        [META, "test.rank0-of-1.bin", "train.rank0-of-1.bin", "val.rank0-of-1.bin"]
    itemsize = 4 if dtype == "float32" else 2
    assert (tmp_path / "context_cache" / "train.rank0-of-1.bin").stat().st_size == 7 * 8 * itemsize  # D per position
    back = ContextCache.open(tmp_path / "context_cache")
    assert back.components == source.components and back.stale_reasons(source.components, 8, source.num_tokens) == []
    for split in ("train", "val", "test"):
        want = sequential_pass(upd, emb, getattr(data, f"{split}_sequences"))
        positions = torch.arange(want.shape[0]).flip(0)  # any order
        torch.testing.assert_close(back.gather(split, positions), want[positions], atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(cache.gather(split, positions), back.gather(split, positions), atol=0, rtol=0)


def test_per_layer_outputs_recomputed_from_final_contexts_equal_the_all_layer_pass():
    """Layer l at position i depends on (c_{i-1}, e_i) only: one parallel forward from the cached
    final contexts gives every layer's output of the sequential pass (what Phase 2 and
    ``cvfp evaluate`` read: D floats per position kept, not every layer's)."""
    torch.manual_seed(0)
    emb = build_embedding(50, {"embed_dim": 12}, default_dim=12)
    seqs = TokenSequences.from_lists([torch.randint(0, 50, (n,)).tolist() for n in (9, 4, 13)])
    for cfg in ({"context_dim": 12, "num_layers": 3, "token_input_all_layers": True},
                {"context_dim": 12, "num_layers": 3, "token_input_all_layers": False},
                {"updater": "gated", "context_dim": 12, "num_layers": 2, "hidden_dim": 16}):
        upd = build_context_updater(cfg, 12)
        final, layers = sequential_pass(upd, emb, seqs, return_all_layers=True)
        kept = final_contexts(emb, upd, {"test": seqs})
        assert kept.tensors["test"].dtype == torch.float32 and kept.tensors["test"].shape == (seqs.num_tokens, 12)
        torch.testing.assert_close(kept.tensors["test"], final, rtol=0, atol=0)
        order = torch.randperm(seqs.num_tokens)  # batches draw positions in any order
        batch = seqs.position_batch(order)
        previous = kept.previous("test", batch["positions"], batch["is_start"])
        assert previous[batch["is_start"]].abs().sum() == 0 and int(batch["is_start"].sum()) == 3  # 3 sequence starts
        layers = [layer[order] for layer in layers]
        with torch.no_grad():
            _, again = upd.update_context_one_step(previous, emb(batch["ids"]), return_all_layers=True)
        assert len(again) == len(layers)
        for got, want in zip(again, layers):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_stale_tampered_and_foreign_caches(tmp_path):
    emb, upd, _ = parts()
    source, other = ContextSource(emb, upd, FakeData(*DATA), HP), ContextSource(emb, upd, FakeData(DATA[0], [[8, 9, 11]]), HP)
    folder = tmp_path / "context_cache"
    contexts, msg = resolve_contexts(folder, "off", source, OneProcess())
    assert "cache off" in msg and not folder.exists()
    with pytest.raises(CVFPUserError, match="no context cache at .*model.cache=require"):
        resolve_contexts(folder, "require", source, OneProcess())
    contexts, msg = resolve_contexts(folder, "auto", source, OneProcess())
    assert msg.startswith("no context cache") and "rewritten" in msg and (folder / META).is_file()
    contexts, msg = resolve_contexts(folder, "auto", source, OneProcess(), write=False)
    assert msg.startswith("context cache hit") and isinstance(contexts, ContextCache)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    # a cache from other data: refused with require (files untouched), rebuilt with auto; evaluation never writes
    with pytest.raises(CVFPUserError, match="stale: the validation token ids differ"):
        resolve_contexts(folder, "require", other, OneProcess())
    _, msg = resolve_contexts(folder, "auto", other, OneProcess(), write=False)
    assert "not written" in msg and {p.name: p.read_bytes() for p in folder.iterdir()} == files
    _, msg = resolve_contexts(folder, "auto", other, OneProcess())
    assert "the validation token ids differ" in msg and ContextCache.open(folder).components == other.components
    # tampered contents (same size, later mtime), a truncated file and a foreign folder
    shard = folder / "train.rank0-of-1.bin"
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CVFPUserError, match="modified after it was written"):
        ContextCache.open(folder)
    _, msg = resolve_contexts(folder, "auto", other, OneProcess(), write=False)
    assert "modified after it was written" in msg
    shard.write_bytes(bytes(raw[:10]))
    with pytest.raises(CVFPUserError, match="size or digest differs"):
        ContextCache.open(folder)
    (folder / META).write_text("{\"not\": \"a cache\"}")
    with pytest.raises(CVFPUserError, match="not a cvfp_lightning context cache"):
        ContextCache.open(folder)
    (folder / META).write_bytes(b"\xff\xfe")
    with pytest.raises(CVFPUserError, match="not a cvfp_lightning context cache"):
        ContextCache.open(folder)


def _val_metrics(model: Phase2LM, dm) -> dict[str, float]:
    t = trainer(max_epochs=2, limit_train_batches=4)
    t.fit(model, datamodule=dm)
    out = t.validate(model, datamodule=dm, verbose=False)[0]
    return {k: v for k, v in out.items() if k.startswith("val/")}


def test_handoff_callback_then_phase2_from_cache_equals_recomputation(tmp_path, corpus, caplog):
    caplog.set_level("INFO")
    dm = text_data(corpus, chunk_size=1024)
    torch.manual_seed(0)
    p1 = Phase1FixedPoint(vocab_size=dm.vocab_size, context=SMALL_CONTEXT, embedding={"embed_dim": 16})
    ckpt_dir = tmp_path / "phase1"
    handoff = ContextCacheHandoff(path=str(ckpt_dir / "context_cache"))
    trainer(callbacks=[handoff], limit_val_batches=0).fit(p1, datamodule=dm)
    torch.save({"state_dict": p1.state_dict(), "hyper_parameters": dict(p1.hparams)}, ckpt_dir / "last.ckpt")
    assert handoff.written == ckpt_dir / "context_cache" and (handoff.written / META).is_file()
    assert "context cache for Phase 2 written to" in caplog.text

    results = {}
    for mode in ("require", "off"):
        torch.manual_seed(1)
        model = Phase2LM(vocab_size=dm.vocab_size, phase1_checkpoint=str(ckpt_dir / "last.ckpt"), cache=mode, lr=3e-3)
        results[mode] = _val_metrics(model, text_data(corpus, chunk_size=1024))
        assert model.context_status.startswith("context cache hit" if mode == "require" else "contexts computed")
    assert results["require"] == results["off"]
    assert set(results["off"]) == {"val/loss", "val/ppl", "val/acc", "val/bpb", "val/tokens"}


def test_phase2_with_other_data_rebuilds_or_refuses(tmp_path, corpus):
    ckpt = phase1_checkpoint(tmp_path / "p1" / "last.ckpt", V)
    Phase2LM(vocab_size=V, phase1_checkpoint=str(ckpt))  # loads
    dm = text_data(corpus)
    model = Phase2LM(vocab_size=V, phase1_checkpoint=str(ckpt), lr=1e-3)
    trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(model, datamodule=dm)
    assert model.context_status.startswith("no context cache") and model.context_status.endswith("(not written)")
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.ckpt"]  # a run without a folder writes none
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path / "logs", name="p2")
    model = Phase2LM(vocab_size=V, phase1_checkpoint=str(ckpt), lr=1e-3)
    trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=logger).fit(model, datamodule=dm)
    own = tmp_path / "logs" / "p2" / "version_0" / "context_cache"
    assert model.context_status.endswith(f"cached in {own}") and (own / META).is_file()
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["last.ckpt"]  # never the Phase 1 run's folder
    other = text_data(corpus, max_seq_len=64)  # same text, other sequences
    strict = Phase2LM(vocab_size=V, phase1_checkpoint=str(ckpt), cache="require", cache_path=str(own))
    with pytest.raises(CVFPUserError, match="stale: the training token ids differ; the validation token ids differ"):
        trainer(max_epochs=1, limit_train_batches=1).fit(strict, datamodule=other)

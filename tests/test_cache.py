"""The Phase 1 -> Phase 2 context cache: fingerprint, stale and tampered caches, the hand-off
callback, and Phase 2 from a cache = Phase 2 from recomputation."""

from __future__ import annotations

import copy

import pytest
import torch

from cvfp_lightning import CVFPUserError
from cvfp_lightning.context_cache import (
    cache_components,
    compute_context_cache,
    contexts_config,
    fingerprint,
    read_context_cache,
    resolve_context_cache,
    save_context_cache,
)
from cvfp_lightning.callbacks import ContextCacheHandoff
from cvfp_lightning.data import TokenSequences
from cvfp_lightning.models import build_context_updater, build_embedding
from cvfp_lightning.modules import Phase1FixedPoint, Phase2LM
from cvfp_lightning.sequential_pass import sequential_pass
from lm_helpers import SMALL_CONTEXT, phase1_checkpoint, text_data, trainer

V = 4096


class FakeData:
    """What the cache reads from a data module."""

    def __init__(self, train: list[list[int]], val: list[list[int]], key: str = "source-a"):
        self.train_sequences, self.val_sequences = TokenSequences.from_lists(train), TokenSequences.from_lists(val)
        self.tokenizer, self._key = None, key

    def cache_key(self) -> str:
        return self._key


def parts(seed: int = 0, vocab: int = 40):
    torch.manual_seed(seed)
    emb = build_embedding(vocab, {"embed_dim": 8}, default_dim=8)
    upd = build_context_updater({"context_dim": 8, "num_layers": 2}, 8)
    return emb, upd, contexts_config(vocab, {"context_dim": 8, "num_layers": 2}, {"embed_dim": 8})


DATA = ([[1, 2, 3, 4], [5, 6, 7]], [[8, 9, 10]])


def test_fingerprint_changes_with_weights_data_tokenizer_and_config():
    emb, upd, cfg = parts()
    base = cache_components(emb, upd, FakeData(*DATA), cfg)
    assert cache_components(emb, upd, FakeData(*DATA), cfg) == base  # deterministic
    changed_weight = copy.deepcopy(upd)
    with torch.no_grad():
        changed_weight.linears[0].state.weight[0, 0] += 1e-6
    variants = {
        "phase1_weights": cache_components(emb, changed_weight, FakeData(*DATA), cfg),
        "train_tokens": cache_components(emb, upd, FakeData([[1, 2, 3, 4], [5, 6, 8]], DATA[1]), cfg),
        "val_tokens": cache_components(emb, upd, FakeData(DATA[0], [[8, 9], [10]]), cfg),
        "data_source": cache_components(emb, upd, FakeData(*DATA, key="source-b"), cfg),
        "config": cache_components(emb, upd, FakeData(*DATA), {**cfg, "vocab_size": 41}),
    }
    for component, comps in variants.items():
        assert fingerprint(comps) != fingerprint(base), component
        assert [k for k in base if comps[k] != base[k]] == [component]
    # options that only change initialisation or training do not invalidate the cache
    assert contexts_config(40, {"context_dim": 8, "init_std": 0.5}, {"freeze": False}) == \
        contexts_config(40, {"context_dim": 8, "init_std": 0.1}, {"freeze": True})


def test_cache_holds_every_layer_of_the_sequential_pass_and_round_trips(tmp_path):
    emb, upd, cfg = parts()
    data = FakeData(*DATA)
    comps = cache_components(emb, upd, data, cfg)
    cache = compute_context_cache(upd, emb, data.train_sequences, data.val_sequences, comps)
    final, layers = sequential_pass(upd, emb, data.train_sequences, return_all_layers=True)
    assert [t.shape for t in cache.layers["train"]] == [(7, 8), (7, 8)]
    for got, want in zip(cache.layers["train"], layers):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(cache.layers["train"][-1], final)
    torch.testing.assert_close(cache.embeddings[torch.tensor([3, 5])], emb(torch.tensor([3, 5])))
    path = save_context_cache(cache, tmp_path / "c.pt")
    back = read_context_cache(path)
    assert back.fingerprint == cache.fingerprint
    for split in ("train", "val"):
        for a, b in zip(back.layers[split], cache.layers[split]):
            assert torch.equal(a, b)


def test_stale_tampered_and_foreign_caches(tmp_path):
    emb, upd, cfg = parts()
    data, other = FakeData(*DATA), FakeData(DATA[0], [[8, 9, 11]])
    comps, other_comps = cache_components(emb, upd, data, cfg), cache_components(emb, upd, other, cfg)
    dims, sizes = upd.layer_dims, {"train": 7, "val": 3}
    built = []

    def build(d=data, c=comps):
        built.append(1)
        return compute_context_cache(upd, emb, d.train_sequences, d.val_sequences, c)

    path = tmp_path / "context_cache.pt"
    cache, msg = resolve_context_cache(path, "off", comps, dims, sizes, build)
    assert "cache off" in msg and not path.exists()
    with pytest.raises(CVFPUserError, match="no context cache at .*model.cache=require"):
        resolve_context_cache(path, "require", comps, dims, sizes, build)
    cache, msg = resolve_context_cache(path, "auto", comps, dims, sizes, build)
    assert msg.startswith("no context cache") and "rewritten" in msg and path.is_file()
    n = len(built)
    cache, msg = resolve_context_cache(path, "require", comps, dims, sizes, build)
    assert msg.startswith("context cache hit") and len(built) == n  # read, not recomputed
    # a cache from other data: refused with require (file untouched), rebuilt with auto
    before = path.read_bytes()
    with pytest.raises(CVFPUserError, match="stale: the validation token ids differ"):
        resolve_context_cache(path, "require", other_comps, dims, sizes, lambda: build(other, other_comps))
    assert path.read_bytes() == before
    cache, msg = resolve_context_cache(path, "auto", other_comps, dims, sizes, lambda: build(other, other_comps))
    assert "the validation token ids differ" in msg and read_context_cache(path).components == other_comps
    # tampered contents, a truncated file and a foreign file
    data_dict = torch.load(path, weights_only=True)
    data_dict["train"][0][0, 0] += 1.0
    torch.save(data_dict, path)
    with pytest.raises(CVFPUserError, match="modified after it was written"):
        read_context_cache(path)
    cache, msg = resolve_context_cache(path, "auto", other_comps, dims, sizes, lambda: build(other, other_comps))
    assert "modified after it was written" in msg
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CVFPUserError, match="not a readable cvfp_lightning file"):
        read_context_cache(path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CVFPUserError, match="not a cvfp_lightning context cache"):
        read_context_cache(path)


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
    handoff = ContextCacheHandoff(path=str(ckpt_dir / "context_cache.pt"))
    trainer(callbacks=[handoff], limit_val_batches=0).fit(p1, datamodule=dm)
    torch.save({"state_dict": p1.state_dict(), "hyper_parameters": dict(p1.hparams)}, ckpt_dir / "last.ckpt")
    assert handoff.written == ckpt_dir / "context_cache.pt" and handoff.written.is_file()
    assert "context cache for Phase 2 written to" in caplog.text

    results = {}
    for mode in ("require", "off"):
        torch.manual_seed(1)
        model = Phase2LM(vocab_size=dm.vocab_size, phase1_checkpoint=str(ckpt_dir / "last.ckpt"), cache=mode, lr=3e-3)
        results[mode] = _val_metrics(model, text_data(corpus, chunk_size=1024))
        assert model.context_status.startswith("context cache hit" if mode == "require" else "contexts computed")
    assert results["require"] == results["off"]
    assert set(results["off"]) == {"val/loss", "val/ppl", "val/acc", "val/bpb"}


def test_phase2_with_other_data_rebuilds_or_refuses(tmp_path, corpus):
    ckpt = phase1_checkpoint(tmp_path / "p1" / "last.ckpt", V)
    Phase2LM(vocab_size=V, phase1_checkpoint=str(ckpt))  # loads
    dm = text_data(corpus)
    model = Phase2LM(vocab_size=V, phase1_checkpoint=str(ckpt), lr=1e-3)
    trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(model, datamodule=dm)
    assert "no context cache" in model.context_status and (ckpt.parent / "context_cache.pt").is_file()
    other = text_data(corpus, max_seq_len=64)  # same text, other sequences
    strict = Phase2LM(vocab_size=V, phase1_checkpoint=str(ckpt), cache="require")
    with pytest.raises(CVFPUserError, match="stale: the training token ids differ; the validation token ids differ"):
        trainer(max_epochs=1, limit_train_batches=1).fit(strict, datamodule=other)

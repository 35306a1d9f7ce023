"""Data pipeline: real datasets/transformers loading code against local files, cache, split."""

from __future__ import annotations

import json
import time

import pytest
import torch

from cvfp_lightning.data import (PositionChunks, SyntheticTokensDataModule, TextDataModule, TokenSequences,
                                 UltraChatDataModule, Windows, load_tokenizer)
from cvfp_lightning.data.base import TokenDataModule
from cvfp_lightning.errors import CVFPUserError


def test_text_module_tokenises_splits_and_holds_out_validation(corpus):
    dm = TextDataModule(paths=[str(corpus)], sequences="samples", val_fraction=0.25)
    assert dm.vocab_size == 4096
    dm.prepare_data()
    dm.setup()
    tr, va = dm.train_sequences, dm.val_sequences
    assert tr.num_sequences == 30 and va.num_sequences == 10  # 40 paragraphs, last quarter held out
    tok = dm.tokenizer
    first = corpus.read_text().split("\n\n")[0]
    assert tr.sequence(0).tolist() == tok(first)["input_ids"] + [tok.eos_token_id]
    assert va.num_bytes > 0 and tr.num_bytes > va.num_bytes
    # the seed's option: validation is the tail of training, not held out
    sub = TextDataModule(paths=[str(corpus)], sequences="samples", val_fraction=0.25, val_subset_of_train=True)
    sub.setup()
    assert sub.train_sequences.num_sequences == 40
    assert torch.equal(sub.val_sequences.ids, va.ids)
    stream = TextDataModule(paths=[str(corpus)], val_fraction=0.25)
    stream.setup()
    assert stream.train_sequences.num_sequences == 1
    assert stream.train_sequences.num_tokens == tr.num_tokens


def test_tokens_are_cached_once_and_keyed_by_source_and_tokenizer(corpus, monkeypatch, tmp_path):
    dm = TextDataModule(paths=[str(corpus)])
    dm.prepare_data()
    assert dm.cache_path().exists()
    key = dm.cache_key()

    def boom(self):
        raise AssertionError("tokenised twice")

    monkeypatch.setattr(TokenDataModule, "tokenize", boom)
    again = TextDataModule(paths=[str(corpus)])
    again.setup()  # served from the cache file
    assert again.train_sequences.num_tokens > 0
    monkeypatch.undo()
    other_tok = tmp_path / "tok"
    tok = load_tokenizer(None)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other_tok)
    assert TextDataModule(paths=[str(corpus)], tokenizer=str(other_tok)).cache_key() != key
    assert TextDataModule(paths=[str(corpus)], add_eos=False).cache_key() != key
    corpus.write_text(corpus.read_text() + "\nmore text\n")
    assert TextDataModule(paths=[str(corpus)]).cache_key() != key


def test_corrupt_token_cache_is_rebuilt_not_trusted(corpus):
    dm = TextDataModule(paths=[str(corpus)])
    dm.prepare_data()
    dm.cache_path().write_bytes(b"not a torch file")
    fresh = TextDataModule(paths=[str(corpus)])
    fresh.setup()
    assert fresh.train_sequences.num_tokens > 100


def test_bundled_corpus_is_the_default():
    dm = TextDataModule(sequences="samples")
    dm.setup()
    assert dm.train_sequences.num_sequences + dm.val_sequences.num_sequences == 79  # pydoc topics
    assert dm.val_sequences.num_sequences == 8  # 10% held out


def test_ultrachat_local_jsonl(ultrachat_jsonl):
    dm = UltraChatDataModule(data_files=str(ultrachat_jsonl), tokenizer=None, num_samples=10,
                             sequences="samples", val_fraction=0.2)
    dm.setup()
    assert dm.train_sequences.num_sequences == 8 and dm.val_sequences.num_sequences == 2
    text = dm.tokenizer.decode(dm.train_sequences.sequence(0)[:-1])
    assert text == ("What is the number 0 in words, and why does it matter?\nThe number 0 is written out as a "
                    "word. It matters because counting is the start of arithmetic.")


def test_ultrachat_bad_rows(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no messages here"}\n')
    with pytest.raises(CVFPUserError, match="no 'messages' column"):
        UltraChatDataModule(data_files=str(bad), tokenizer=None).setup()


def test_local_tokenizer_folder_and_offline_hub_miss(tmp_path):
    folder = tmp_path / "tok"
    load_tokenizer(None).save_pretrained(folder)
    assert len(load_tokenizer(str(folder))) == 4096
    start = time.perf_counter()
    with pytest.raises(CVFPUserError, match="local folder") as info:
        load_tokenizer("surely-not-a-real-org/not-a-tokenizer")
    assert time.perf_counter() - start < 10  # no 46 s of retries
    assert "\n" not in str(info.value)
    with pytest.raises(CVFPUserError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))


@pytest.mark.parametrize("make, match", [
    (lambda p: [str(p / "missing.txt")], "does not exist"),
    (lambda p: [str((p / "empty.txt"))], "is empty"),
    (lambda p: [str((p / "latin1.txt"))], "not UTF-8"),
    (lambda p: [], "empty list"),
])
def test_bad_text_files(tmp_path, make, match):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 5)
    with pytest.raises(CVFPUserError, match=match):
        TextDataModule(paths=make(tmp_path)).setup()


def test_whitespace_only_file_has_no_text(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    with pytest.raises(CVFPUserError, match="no text"):
        TextDataModule(paths=[str(tmp_path / "blank.txt")]).setup()


@pytest.mark.parametrize("kwargs", [dict(val_fraction=1.5), dict(sequences="tokens"), dict(chunk_size=0),
                                    dict(num_samples=0)])
def test_bad_data_options(kwargs):
    with pytest.raises(CVFPUserError):
        TextDataModule(**kwargs)


def test_synthetic_reference_workload_is_deterministic():
    a, b = SyntheticTokensDataModule(), SyntheticTokensDataModule()
    a.setup(), b.setup()
    assert a.train_sequences.num_tokens == 6400 and a.val_sequences.num_tokens == 1280
    assert torch.equal(a.train_sequences.ids, b.train_sequences.ids)
    assert int(a.train_sequences.ids.max()) < 50257
    s = SyntheticTokensDataModule(sequences="samples", max_seq_len=128)
    s.setup()
    assert s.train_sequences.num_sequences == 50


def test_position_chunks_shard_without_duplicates():
    seqs = TokenSequences.from_lists([list(range(10)), list(range(7))])
    chunks = PositionChunks(seqs, chunk_size=4, world_size=2)
    assert len(chunks) == 6  # 5 real chunks + 1 empty so both ranks get 3
    rank_positions = [torch.cat([chunks[k]["positions"] for k in range(r, len(chunks), 2)]) for r in range(2)]
    everything = torch.cat(rank_positions).sort().values
    assert torch.equal(everything, torch.arange(17))
    assert chunks[5]["positions"].numel() == 0


def test_windows_never_cross_sequences():
    seqs = TokenSequences.from_lists([[1, 2, 3, 4, 5], [6, 7, 8]])
    w = Windows(seqs, seq_len=4)
    assert len(w) == 3
    assert w[0]["input_ids"].tolist() == [1, 2, 3, 4] and w[0]["targets"].tolist() == [2, 3, 4, 5]
    assert w[1]["input_ids"].tolist() == [5, 0, 0, 0] and w[1]["targets"].tolist() == [-100] * 4
    assert w[2]["targets"].tolist() == [7, 8, -100, -100]


def test_train_samples_keeps_the_validation_set_fixed(corpus):
    full = TextDataModule(paths=[str(corpus)], sequences="samples", val_fraction=0.25)
    few = TextDataModule(paths=[str(corpus)], sequences="samples", val_fraction=0.25, train_samples=7)
    full.setup(), few.setup()
    assert few.train_sequences.num_sequences == 7
    assert torch.equal(few.train_sequences.ids, full.train_sequences.ids[: few.train_sequences.num_tokens])
    assert torch.equal(few.val_sequences.ids, full.val_sequences.ids)  # the same validation text
    with pytest.raises(CVFPUserError, match="only 30 samples for training"):
        TextDataModule(paths=[str(corpus)], sequences="samples", val_fraction=0.25, train_samples=31).setup()


# ---- the memory-mapped token cache, splits as views, test split -----------------------------
import hashlib  # noqa: E402
import logging  # noqa: E402

import numpy as np  # noqa: E402

from cvfp_lightning.context_cache import _update_tensor, sequences_digest  # noqa: E402
from cvfp_lightning.data.sequences import IGNORE_INDEX, EpochShuffleSampler  # noqa: E402
from cvfp_lightning.data.token_cache import TokenCacheWriter, read_token_cache  # noqa: E402


def _texts(dm, source="main") -> list[str]:
    return list(dm.load_texts(source)["text"])


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def test_bundled_splits_are_views_of_one_memmap_with_the_shipped_numbers():
    dm = TextDataModule(sequences="samples", max_seq_len=512)  # the demo configs' data block
    dm.setup()
    tr, va = dm.train_sequences, dm.val_sequences
    assert (tr.num_tokens, va.num_tokens) == (105_679, 8_948)  # README's numbers, unchanged by the memmap
    assert tr.token_ids.dtype == torch.uint16 and dm.test_sequences is None
    # the same ids, offsets and bytes as tokenising each topic directly
    texts = _texts(dm)
    samples = [_encode(dm.tokenizer, t) for t in texts]
    k = round(0.1 * len(samples))
    expected_train = TokenSequences.from_lists(samples[:-k]).split_long(512)
    assert torch.equal(tr.ids, expected_train.ids) and torch.equal(tr.offsets, expected_train.offsets)
    assert torch.equal(va.ids, torch.tensor([i for s in samples[-k:] for i in s]))
    assert tr.num_bytes == sum(len(t.encode("utf-8")) for t in texts[:-k])
    assert va.num_bytes == sum(len(t.encode("utf-8")) for t in texts[-k:])
    # views: one storage, train and validation adjacent, so Phase 1's concatenation copies nothing
    assert tr.token_ids.untyped_storage().data_ptr() == va.token_ids.untyped_storage().data_ptr()
    both = TokenSequences.concat([tr, va])
    assert both.token_ids.untyped_storage().data_ptr() == tr.token_ids.untyped_storage().data_ptr()
    assert torch.equal(both.ids, torch.cat([tr.ids, va.ids]))


def test_sequences_digest_is_the_int64_digest_read_in_blocks():
    seqs = SyntheticTokensDataModule(num_tokens=(1 << 20) + 123, val_tokens=7)
    seqs.setup()
    tr = seqs.train_sequences
    h = hashlib.sha256()  # the digest's definition: ids as one int64 tensor, then offsets
    _update_tensor(h, "ids", tr.ids)
    _update_tensor(h, "offsets", tr.offsets)
    assert sequences_digest(tr) == h.hexdigest()


def test_test_split_is_held_out_after_validation_with_exact_bytes(corpus):
    dm = TextDataModule(paths=[str(corpus)], sequences="samples", val_fraction=0.2, test_fraction=0.1)
    dm.setup()
    tr, va, te = dm.split("train"), dm.split("val"), dm.split("test")
    assert (tr.num_sequences, va.num_sequences, te.num_sequences) == (28, 8, 4)  # [train | val | test] of 40
    texts, tok = _texts(dm), dm.tokenizer
    assert te.ids.tolist() == [i for t in texts[-4:] for i in _encode(tok, t)]
    assert va.ids.tolist() == [i for t in texts[28:36] for i in _encode(tok, t)]
    assert te.num_bytes == sum(len(t.encode("utf-8")) for t in texts[-4:])
    assert va.num_bytes == sum(len(t.encode("utf-8")) for t in texts[28:36])
    assert tr.num_bytes == sum(len(t.encode("utf-8")) for t in texts[:28])
    # the seed's option keeps the test split held out; validation is the tail of training
    sub = TextDataModule(paths=[str(corpus)], sequences="samples", val_fraction=0.2, test_fraction=0.1,
                         val_subset_of_train=True)
    sub.setup()
    assert sub.train_sequences.num_sequences == 36 and torch.equal(sub.test_sequences.ids, te.ids)
    assert torch.equal(sub.val_sequences.ids, va.ids)  # the last 8 of its 36 training samples
    with pytest.raises(CVFPUserError, match="split 'dev' is unknown"):
        dm.split("dev")
    with pytest.raises(CVFPUserError, match="leaves nothing to train on"):
        TextDataModule(val_fraction=0.5, test_fraction=0.5)


def test_single_document_splits_tokens_and_shares_bytes_by_tokens(corpus):
    dm = TextDataModule(paths=[str(corpus)], sample_by="document", val_fraction=0.1, test_fraction=0.1)
    dm.setup()
    (text,) = _texts(dm)
    n, nb = dm.train_sequences.num_tokens + dm.val_sequences.num_tokens + dm.test_sequences.num_tokens, len(
        text.encode("utf-8"))
    n_val, n_test = round(0.1 * n), round(0.1 * n)
    assert (dm.val_sequences.num_tokens, dm.test_sequences.num_tokens) == (n_val, n_test)
    assert dm.val_sequences.num_bytes == round(nb * n_val / n) and dm.test_sequences.num_bytes == round(nb * n_test / n)
    assert dm.train_sequences.num_bytes + dm.val_sequences.num_bytes + dm.test_sequences.num_bytes == nb


def test_val_and_test_files(corpus, tmp_path):
    paragraphs = corpus.read_text().split("\n\n")
    val_file, test_file = tmp_path / "val.txt", tmp_path / "test.txt"
    val_file.write_text("\n\n".join(paragraphs[:3]) + "\n")
    test_file.write_text("\n\n".join(paragraphs[3:5]) + "\n")
    dm = TextDataModule(paths=[str(corpus)], val_paths=str(val_file), test_paths=[str(test_file)], sequences="samples")
    dm.setup()
    assert dm.train_sequences.num_sequences == 40  # nothing held out of paths
    assert (dm.val_sequences.num_sequences, dm.test_sequences.num_sequences) == (3, 2)
    test_texts = _texts(dm, "test")
    assert dm.test_sequences.num_bytes == sum(len(t.encode("utf-8")) for t in test_texts)
    assert dm.test_sequences.ids.tolist() == [i for t in test_texts for i in _encode(dm.tokenizer, t)]
    assert dm.cache_key() != TextDataModule(paths=[str(corpus)], val_paths=str(val_file)).cache_key()
    with pytest.raises(CVFPUserError, match="val_subset_of_train"):
        TextDataModule(paths=[str(corpus)], val_paths=str(val_file), val_subset_of_train=True)
    with pytest.raises(CVFPUserError, match="test data file"):
        TextDataModule(paths=[str(corpus)], test_paths=str(tmp_path / "missing.txt"))


def test_test_dataloader_reads_the_test_split_or_falls_back_to_validation(corpus):
    dm = TextDataModule(paths=[str(corpus)], sequences="samples", val_fraction=0.2, test_fraction=0.1)
    dm.connect("position_chunks")
    positions = torch.cat([b["positions"] for b in dm.test_dataloader()])
    assert torch.equal(positions, torch.arange(dm.test_sequences.num_tokens))
    assert torch.equal(torch.cat([b["ids"] for b in dm.test_dataloader()]), dm.test_sequences.ids)
    plain = TextDataModule(paths=[str(corpus)], sequences="samples", val_fraction=0.2)
    plain.connect("position_chunks")
    assert torch.equal(torch.cat([b["ids"] for b in plain.test_dataloader()]), plain.val_sequences.ids)


def test_truncated_or_corrupt_cache_is_detected_and_rebuilt(corpus, caplog):
    dm = TextDataModule(paths=[str(corpus)], sequences="samples")
    dm.setup()
    reference = dm.train_sequences.ids.clone()
    folder, key = dm.cache_folder(), dm.cache_key()
    ids_bin = folder / "ids.bin"
    data = ids_bin.read_bytes()
    ids_bin.write_bytes(data[:-2])  # one id short
    with pytest.raises(CVFPUserError, match="ids.bin of .* bytes, expected .*truncated") as info:
        read_token_cache(folder, key)
    assert "\n" not in str(info.value)
    ids_bin.write_bytes(data[:10] + bytes([data[10] ^ 1]) + data[11:])  # same size, one bit flipped
    with pytest.raises(CVFPUserError, match="sha256 differs"):
        read_token_cache(folder, key)
    with pytest.raises(CVFPUserError, match="was written for key"):
        read_token_cache(folder, "0" * 32)
    with caplog.at_level(logging.WARNING, logger="cvfp_lightning.data.base"):
        again = TextDataModule(paths=[str(corpus)], sequences="samples")
        again.setup()
    assert "sha256 differs" in caplog.text and "re-tokenising" in caplog.text
    assert torch.equal(again.train_sequences.ids, reference)
    read_token_cache(folder, key)  # the rebuilt cache is whole again


def test_a_failed_write_leaves_no_cache_behind(tmp_path):
    folder = tmp_path / "tokens" / "k"
    with pytest.raises(RuntimeError):
        with TokenCacheWriter(folder, "k", vocab_size=10) as writer:
            writer.add([[1, 2, 3]], [3])
            raise RuntimeError("interrupted")
    assert not folder.exists() and list((tmp_path / "tokens").iterdir()) == []
    with TokenCacheWriter(folder, "k", vocab_size=10) as writer:
        with pytest.raises(CVFPUserError, match="token id 12 is outside the vocabulary of 10"):
            writer.add([[1, 12]], [2])


def test_uint32_vocabulary_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 70_000, size=n) for n in (5, 1, 9)] + [[69_999, 65_536, 0]]
    with TokenCacheWriter(tmp_path / "k", "k", vocab_size=70_000) as writer:
        writer.add(samples[:2], [11, 0])
        writer.add([[]], [4])  # an empty sample is dropped with its bytes
        writer.add(samples[2:], [5, 6])
        writer.commit()
    ids, offsets, nbytes = read_token_cache(tmp_path / "k", "k")
    assert ids.dtype == torch.uint32
    assert ids.long().tolist() == [int(i) for s in samples for i in s]
    assert offsets.tolist() == [0, 5, 6, 15, 18] and nbytes.tolist() == [11, 0, 5, 6]
    synth = SyntheticTokensDataModule(vocab_size=100_000, num_tokens=3000, val_tokens=500)
    synth.setup()
    g = torch.Generator().manual_seed(42)
    assert synth.train_sequences.token_ids.dtype == torch.uint32
    assert torch.equal(torch.cat([synth.train_sequences.ids, synth.val_sequences.ids]),
                       torch.randint(0, 100_000, (3500,), generator=g))


def _reference_batch(lists, positions):
    """Position batch fields by walking the lists (the definition)."""
    flat, start, target = [], [], []
    for s in lists:
        for j, i in enumerate(s):
            flat.append(i)
            start.append(j == 0)
            target.append(s[j + 1] if j + 1 < len(s) else IGNORE_INDEX)
    return ([flat[p] for p in positions], [start[p] for p in positions], [target[p] for p in positions])


def test_position_batches_are_computed_per_batch_from_ids_and_offsets():
    lists = [[5, 6, 7], [], [8], [9, 10, 11, 12], [], [13, 14]]
    seqs = TokenSequences.from_lists(lists)
    positions = torch.tensor([9, 0, 3, 2, 4, 7, 8, 1, 9, 5])
    batch = seqs.position_batch(positions)
    ids, start, target = _reference_batch(lists, positions.tolist())
    assert batch["ids"].tolist() == ids and batch["is_start"].tolist() == start
    assert batch["targets"].tolist() == target
    assert seqs.position_batch(torch.zeros(0, dtype=torch.long))["ids"].numel() == 0
    pieces = seqs.split_long(2)
    assert [pieces.sequence(s).tolist() for s in range(pieces.num_sequences)] == \
        [[5, 6], [7], [8], [9, 10], [11, 12], [13, 14]]
    assert torch.equal(pieces.ids, seqs.ids)
    assert seqs.first_occurrences().tolist() == list(range(5, 15))
    repeated = TokenSequences.from_lists([[3, 1, 3, 2, 1, 0]])
    assert repeated.first_occurrences(3).tolist() == [3, 1, 2]


def test_epoch_shuffle_is_the_int64_permutation():
    sampler = EpochShuffleSampler(100_003, seed=7)
    sampler.set_epoch(2)
    g = torch.Generator().manual_seed((7 * 1_000_003 + 2) % (2**63 - 1))
    assert list(sampler) == torch.randperm(100_003, generator=g).tolist()


def test_ultrachat_hub_test_split(monkeypatch, ultrachat_jsonl):
    import datasets

    rows = [json.loads(line) for line in ultrachat_jsonl.read_text().splitlines()]
    calls = []

    def fake_load(name, split=None, **kwargs):  # the hub, offline: train_sft and test_sft rows
        calls.append(split)
        base, _, rest = split.partition("[:")
        n = int(rest.rstrip("]")) if rest else None
        chosen = rows if base == "train_sft" else [
            {**r, "messages": [{"role": "user", "content": f"test {i}"}]} for i, r in enumerate(rows)]
        return datasets.Dataset.from_list(chosen[:n])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    dm = UltraChatDataModule(tokenizer=None, num_samples=10, sequences="samples", val_fraction=0.2)
    dm.setup()
    assert calls == ["train_sft[:10]", "test_sft[:2]"]  # as many test rows as validation rows
    assert (dm.train_sequences.num_sequences, dm.val_sequences.num_sequences) == (8, 2)
    assert dm.test_sequences.num_bytes == len("test 0") + len("test 1")
    assert dm.tokenizer.decode(dm.test_sequences.sequence(1)[:-1]) == "test 1"
    held = UltraChatDataModule(tokenizer=None, num_samples=10, sequences="samples", val_fraction=0.2,
                               test_fraction=0.1)
    held.setup()
    assert held.test_sequences.num_sequences == 1 and len(calls) == 2  # held out: test_sft is not read

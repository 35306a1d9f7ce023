"""Data pipeline: real datasets/transformers loading code against local files, cache, split."""

from __future__ import annotations

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

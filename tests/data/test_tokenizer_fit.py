"""``data.tokenizer: {train: {vocab_size: N}}``: a byte-level BPE fitted on the training split only,
cached by content, fingerprinted and carried like any tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvfp_lightning import CVFPUserError
from cvfp_lightning.data import TextDataModule
from cvfp_lightning.data import tokenizer_fit
from cvfp_lightning.data.snapshot import data_snapshot, restore_tokenizer
from cvfp_lightning.data.tokenizer import tokenizer_fingerprint

ONLY_HELD_OUT = "Zyqvexmorph"  # a word that occurs only in validation / test text
FIT = {"train": {"vocab_size": 400}}


def write_corpus(folder: Path, held_out_copies: int = 60) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    train = [f"The function returns the value {k} of the list, and the loop ends." for k in range(80)]
    held = [" ".join([ONLY_HELD_OUT] * 6) + f" {k}." for k in range(held_out_copies)]
    files = {"train": folder / "train.txt", "val": folder / "val.txt", "test": folder / "test.txt",
             "all": folder / "all.txt"}
    files["train"].write_text("\n\n".join(train) + "\n", encoding="utf-8")
    files["val"].write_text("\n\n".join(held[: held_out_copies // 2]) + "\n", encoding="utf-8")
    files["test"].write_text("\n\n".join(held[held_out_copies // 2:]) + "\n", encoding="utf-8")
    # one file laid out [train | val | test] for the held-out fractions: 80 + 10 + 10 samples
    files["all"].write_text("\n\n".join(train + held[:10] + held[10:20]) + "\n", encoding="utf-8")
    return files


def pieces(tokenizer, word: str) -> int:
    return len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])


def test_the_fit_sees_only_the_training_split(tmp_path):
    files = write_corpus(tmp_path / "text")
    own_files = TextDataModule(paths=[str(files["train"])], val_paths=[str(files["val"])],
                               test_paths=[str(files["test"])], tokenizer=FIT, cache_dir=str(tmp_path / "c1"))
    fractions = TextDataModule(paths=[str(files["all"])], val_fraction=0.1, test_fraction=0.1, tokenizer=FIT,
                               cache_dir=str(tmp_path / "c2"))
    everything = TextDataModule(paths=[str(files["all"])], val_fraction=0.1, val_subset_of_train=True,
                                tokenizer=FIT, cache_dir=str(tmp_path / "c3"))  # the word is in its training text
    assert pieces(everything.tokenizer, ONLY_HELD_OUT) <= 2  # fitted on it, the word is (nearly) one token
    for dm in (own_files, fractions):
        assert len(dm.train_texts()) == 80
        assert not any(ONLY_HELD_OUT in t for t in dm.train_texts()["text"])
        assert pieces(dm.tokenizer, ONLY_HELD_OUT) >= len(ONLY_HELD_OUT) - 1  # no merge of the held-out word
        assert pieces(dm.tokenizer, "function") == 1  # the training words are merges
        assert dm.tokenizer.eos_token == tokenizer_fit.EOS
        dm.setup()
        eos = dm.tokenizer.eos_token_id
        assert dm.train_sequences.sequence(0)[-1].item() == eos  # the EOS the data module appends


def test_a_fit_is_cached_by_content_and_fingerprinted_like_any_tokenizer(tmp_path, monkeypatch):
    files = write_corpus(tmp_path / "text")
    cache = str(tmp_path / "cache")
    first = TextDataModule(paths=[str(files["train"])], tokenizer=FIT, cache_dir=cache)
    fingerprint = tokenizer_fingerprint(first.tokenizer)
    folders = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert len(folders) == 1 and (folders[0] / "tokenizer.json").is_file() and (folders[0] / "fit.json").is_file()

    def no_refit(*args, **kwargs):
        raise AssertionError("the cached fit was fitted again")

    monkeypatch.setattr(tokenizer_fit, "fit_byte_level_bpe", no_refit)
    again = TextDataModule(paths=[str(files["train"])], tokenizer=FIT, cache_dir=cache)
    assert tokenizer_fingerprint(again.tokenizer) == fingerprint and again.cache_key() == first.cache_key()
    monkeypatch.undo()

    smaller = TextDataModule(paths=[str(files["train"])], tokenizer={"train": {"vocab_size": 300}}, cache_dir=cache)
    other_text = TextDataModule(paths=[str(files["all"])], tokenizer=FIT, cache_dir=cache)
    fingerprints = {fingerprint, tokenizer_fingerprint(smaller.tokenizer), tokenizer_fingerprint(other_text.tokenizer)}
    assert len(fingerprints) == 3  # different fits, different fingerprints (and token caches)
    assert len({first.cache_key(), smaller.cache_key(), other_text.cache_key()}) == 3
    assert len(smaller.tokenizer) == smaller.vocab_size <= 300

    snapshot = data_snapshot(first)  # what every checkpoint carries: the fitted tokenizer itself
    assert tokenizer_fingerprint(restore_tokenizer(snapshot["tokenizer"])) == fingerprint


def test_refitting_the_same_text_gives_the_same_tokenizer(tmp_path):
    files = write_corpus(tmp_path / "text")
    a = TextDataModule(paths=[str(files["train"])], tokenizer=FIT, cache_dir=str(tmp_path / "a"))
    b = TextDataModule(paths=[str(files["train"])], tokenizer=FIT, cache_dir=str(tmp_path / "b"))
    assert tokenizer_fingerprint(a.tokenizer) == tokenizer_fingerprint(b.tokenizer)


@pytest.mark.parametrize("spec, message", [
    ({"train": {"vocab_size": 100}}, "vocab_size=100 is invalid"),
    ({"train": {"vocab": 1000}}, "unknown keys"),
    ({"fit": {"vocab_size": 1000}}, "a mapping must be"),
])
def test_bad_fit_options_are_one_clear_error(tmp_path, spec, message):
    files = write_corpus(tmp_path / "text")
    with pytest.raises(CVFPUserError, match=message):
        TextDataModule(paths=[str(files["train"])], tokenizer=spec, cache_dir=str(tmp_path / "c")).tokenizer


def test_a_single_document_with_held_out_tails_is_refused(tmp_path):
    files = write_corpus(tmp_path / "text")
    dm = TextDataModule(paths=[str(files["all"])], sample_by="document", tokenizer=FIT, cache_dir=str(tmp_path / "c"))
    with pytest.raises(CVFPUserError, match="holds a single sample.*data.sample_by paragraph\\.$"):
        dm.tokenizer
    one_paragraph = tmp_path / "one.txt"  # lines but no blank line: one paragraph
    one_paragraph.write_text("\n".join(f"line {k} of the only paragraph" for k in range(50)) + "\n", encoding="utf-8")
    dm = TextDataModule(paths=[str(one_paragraph)], tokenizer=FIT, cache_dir=str(tmp_path / "c"))
    with pytest.raises(CVFPUserError, match="holds a single sample.*data.sample_by line\\.$"):
        dm.tokenizer

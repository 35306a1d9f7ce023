"""Tokenizer choices scored in seconds: an interpolated trigram LM's bits per byte on validation and test.

    .venv/bin/python benchmarks/tokenizer_ngram.py --corpus licenses --fits 2048:8 2048:8:mix 1024:8

For ``quality.py``'s splits of ``--corpus``, each tokenizer (``bundled``, and one byte-level BPE
per ``--fits`` entry ``VOCAB:MIN_FREQUENCY[:mix]``, fitted by the package's own
``fit_byte_level_bpe`` on the training split, ``mix`` = the training split plus the bundled
corpus: on ``--corpus bundled`` that is every topic, held-out ones included) is scored by a
trigram model of its training-split ids with absolute discounting (D = 0.75) interpolated
down to an add-1/2 unigram:

    p(w | a, b) = max(n(a,b,w) - D, 0) / n(a,b) + D * |{w': n(a,b,w') > 0}| / n(a,b) * p(w | b)

(the same for ``p(w | b)`` over the unigram; an unseen history falls through), summed as
``-log2 p`` over every id after the first of each sample and divided by the samples' UTF-8
bytes, as ``cvfp evaluate`` counts. A proxy, not the neural model: it tells which
tokenizer generalises to held-out text, before spending minutes per Phase 1 + Phase 2 run.
Prints one JSON line per tokenizer and writes ``results/tokenizer_ngram_<time>.json``.
"""

from __future__ import annotations

import argparse
import collections
import math
from pathlib import Path

from quality import write_splits
from report import write_report

DISCOUNT = 0.75
START, END = -2, -1  # the history before a sample's first id; the id after its last (its EOS)


def paragraphs(path: Path) -> list[str]:
    return [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]


def trigram_bpb(encode, vocab_size: int, splits: dict[str, list[str]]) -> dict[str, float]:
    """``{"val": bpb, "test": bpb}`` of the trigram model of ``encode``'s ids of ``splits["train"]``."""
    tri, bi, uni = collections.Counter(), collections.Counter(), collections.Counter()
    hist2, hist1 = collections.Counter(), collections.Counter()
    next2, next1 = collections.defaultdict(set), collections.defaultdict(set)
    for text in splits["train"]:
        ids = [START, START] + encode(text) + [END]
        for a, b, w in zip(ids, ids[1:], ids[2:]):
            tri[a, b, w] += 1
            hist2[a, b] += 1
            next2[a, b].add(w)
            bi[b, w] += 1
            hist1[b] += 1
            next1[b].add(w)
            uni[w] += 1
    total = sum(uni.values())

    def prob(a: int, b: int, w: int) -> float:
        p = (uni[w] + 0.5) / (total + 0.5 * (vocab_size + 1))
        if hist1[b]:
            p = max(bi[b, w] - DISCOUNT, 0) / hist1[b] + DISCOUNT * len(next1[b]) / hist1[b] * p
        if hist2[a, b]:
            p = max(tri[a, b, w] - DISCOUNT, 0) / hist2[a, b] + DISCOUNT * len(next2[a, b]) / hist2[a, b] * p
        return p

    out = {}
    for split in ("val", "test"):
        bits = num_bytes = 0.0
        for text in splits[split]:
            num_bytes += len(text.encode("utf-8"))
            ids = [START, START] + encode(text) + [END]
            bits -= sum(math.log2(prob(a, b, w)) for a, b, w in list(zip(ids, ids[1:], ids[2:]))[1:])
        out[split] = round(bits / num_bytes, 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="licenses", choices=["licenses", "bundled"])
    parser.add_argument("--fits", nargs="*", default=["2048:8", "2048:8:mix"], help="VOCAB:MIN_FREQUENCY[:mix]")
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/cvfp_tokenizer_ngram"))
    args = parser.parse_args()

    from cvfp_lightning.data.tokenizer import bundled_data_dir, load_tokenizer
    from cvfp_lightning.data.tokenizer_fit import BPETraining, fit_byte_level_bpe

    files = write_splits(args.corpus, args.work_dir / args.corpus)
    splits = {name: paragraphs(path) for name, path in files.items()}
    tokenizers = {"bundled": load_tokenizer(None)}
    for fit in args.fits:
        vocab, min_frequency, *mix = fit.split(":")
        if mix not in ([], ["mix"]):
            parser.error(f"--fits {fit!r}: expected VOCAB:MIN_FREQUENCY or VOCAB:MIN_FREQUENCY:mix")
        texts = splits["train"] + (paragraphs(bundled_data_dir() / "pydoc_topics.txt") if mix else [])
        spec = BPETraining(vocab_size=int(vocab), min_frequency=int(min_frequency))
        tokenizers[fit] = fit_byte_level_bpe(texts, spec)
    rows = []
    for name, tokenizer in tokenizers.items():
        def encode(text: str, tokenizer=tokenizer) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        row = {"corpus": args.corpus, "tokenizer": name, "ids": len(tokenizer),
               **trigram_bpb(encode, len(tokenizer), splits)}
        print(row, flush=True)
        rows.append(row)
    write_report("tokenizer_ngram", {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows})


if __name__ == "__main__":
    main()

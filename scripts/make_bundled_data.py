"""Make the bundled default corpus and tokenizer (run once; outputs are committed as package data).

Corpus: CPython's ``pydoc_data.topics`` (PSF licence), one topic per paragraph block,
topics separated by a blank line, written to ``pydoc_topics.txt`` in the bundled-data folder
(``cvfp_lightning/data/bundled/``, or ``$CVFP_DATA_DIR`` when set, or ``--out``). Shipping the text
keeps results identical across Python versions (the topics change between releases).

Tokenizer: byte-level BPE (``tokenizers.ByteLevelBPETokenizer``) trained on that corpus,
with ``<|endoftext|>`` as bos/eos/unk like GPT-2, saved with ``save_pretrained`` to
``tokenizer/`` in the same folder so ``AutoTokenizer.from_pretrained`` loads it offline.

    python scripts/make_bundled_data.py [--vocab-size 4096] [--out FOLDER]
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DATA = ROOT / "cvfp_lightning" / "data" / "bundled"  # = cvfp_lightning.data.tokenizer.PACKAGE_DATA


def corpus_text() -> str:
    from pydoc_data import topics

    blocks = []
    for name in sorted(topics.topics):
        text = topics.topics[name].replace("\r\n", "\n")
        # one topic = one sample: collapse its internal blank lines so paragraphs = topics
        text = re.sub(r"\n\s*\n+", "\n", text.strip())
        blocks.append(text)
    return "\n\n".join(blocks) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("CVFP_DATA_DIR") or PACKAGE_DATA),
                        help="the bundled-data folder (default: $CVFP_DATA_DIR, else the package's data/bundled)")
    args = parser.parse_args()
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    data = args.out
    data.mkdir(parents=True, exist_ok=True)
    corpus = data / "pydoc_topics.txt"
    corpus.write_text(corpus_text(), encoding="utf-8")
    bpe = ByteLevelBPETokenizer()
    bpe.train(files=[str(corpus)], vocab_size=args.vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  unk_token="<|endoftext|>", model_max_length=1 << 30)
    tok.save_pretrained(str(data / "tokenizer"))
    print(f"wrote {corpus} ({corpus.stat().st_size} bytes) and {data / 'tokenizer'} (vocab {len(tok)})")


if __name__ == "__main__":
    main()

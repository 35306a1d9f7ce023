"""``cvfp generate MODEL --prompt TEXT``: continue prompts with an exported model (or a checkpoint).

    cvfp generate exports/phase2 --prompt "The for statement" --max_new_tokens 40
    cvfp generate exports/phase2 --prompt "The for statement" --temperature 0.8 --top_k 40 --top_p 0.95 --seed 7
    cvfp generate exports/phase2 --prompt_file prompts.txt --greedy true --out generations.jsonl
    echo "A class definition" | cvfp generate exports/phase2 --prompt_file -

Prompts come from ``--prompt`` (one or more) and ``--prompt_file`` (one prompt per
non-empty line; ``-`` reads stdin). Each is encoded with the model's tokenizer and
continued by ``max_new_tokens`` ids with the model's ``generate``: for CVFP models the
implementation of ``cvfp predict`` (:meth:`CVFPLanguageModel.generate`), for baselines the
same decode loop over their recurrent state or window (:mod:`cvfp_lightning.generation`).
``--greedy true`` takes the most likely id; otherwise temperature, top-k and top-p
(``transformers``' logits warpers) shape the distribution and ``--seed`` seeds every
prompt's draws afresh, so a prompt's continuation depends on the prompt and the seed only.
Output: prompt and continuation on stdout; with ``--out`` also JSON lines ``{"prompt",
"continuation", "new_tokens", "ids"}``, the format of ``cvfp predict``'s ``generations.jsonl``.
A CVFP model exported with a continuous cache generates with it (the memory holds the prompt
and the ids generated so far), which also strengthens repetition in greedy decoding;
``--continuous_cache.weight 0`` generates with the model alone (``.size``, ``.theta`` change it).
``--out`` is checked before the model loads: an existing file there is replaced only when it
holds earlier generations (every line such a record) or is empty; any other file is refused
and kept, as are a folder or a path that cannot be written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from cvfp_lightning.data.prompts import read_prompts
from cvfp_lightning.errors import check
from cvfp_lightning.generation import check_sampling
from cvfp_lightning.io import check_output_file, read_text_upto, write_output

GENERATION_KEYS = ("prompt", "continuation", "new_tokens", "ids")
EARLIER = "earlier generations (JSON lines with the keys " + ", ".join(GENERATION_KEYS) + ")"


def is_generations(path: Path) -> bool:
    """Whether ``path`` holds earlier generations, JSON lines of ``GENERATION_KEYS`` (what ``--out`` may replace)."""
    text = read_text_upto(path, 256 << 20)
    lines = [line for line in (text or "").splitlines() if line.strip()]
    try:
        records = [json.loads(line) for line in lines]
    except ValueError:
        return False
    return bool(records) and all(isinstance(r, dict) and all(key in r for key in GENERATION_KEYS) for r in records)


def generate(model, prompts: list[str], max_new_tokens: int = 50, greedy: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> list[dict]:
    """One record per prompt: ``{"prompt", "continuation", "new_tokens", "ids"}``."""
    import torch

    tokenizer = model.tokenizer
    out = []
    for k, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        check(len(ids) > 0, f"prompt {k} ({prompt!r}) gives no tokens: give some text to continue.")
        new_ids = model.generate(torch.tensor(ids, dtype=torch.long), max_new_tokens, temperature, top_k, greedy,
                                 top_p=top_p, seed=seed)
        out.append({"prompt": prompt, "continuation": tokenizer.decode(new_ids.tolist(),
                                                                       clean_up_tokenization_spaces=False),
                    "new_tokens": int(new_ids.numel()), "ids": new_ids.tolist()})
    return out


def build_parser():
    from cvfp_lightning.export import model_parser

    parser = model_parser("cvfp generate", (
        "Continue prompts with an exported model (cvfp export) or a Phase 2 / baseline checkpoint: greedy, or "
        "temperature / top-k / top-p sampling, deterministic with --seed."))
    parser.add_argument("--prompt", type=str, nargs="+", default=None, help="prompt text (one or more)")
    parser.add_argument("--prompt_file", type=Optional[str], default=None,
                        help="a UTF-8 file with one prompt per line; - reads stdin")
    parser.add_argument("--max_new_tokens", type=int, default=50, help="ids generated per prompt")
    parser.add_argument("--greedy", type=bool, default=False, help="take the most likely id instead of sampling")
    parser.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0)")
    parser.add_argument("--top_k", type=Optional[int], default=None, help="sample among the k most likely ids")
    parser.add_argument("--top_p", type=Optional[float], default=None,
                        help="sample among the most likely ids whose probabilities sum to top_p (0 < top_p <= 1)")
    parser.add_argument("--seed", type=Optional[int], default=42, help="seed of every prompt's draws (null: unseeded)")
    parser.add_argument("--out", type=Optional[str], default=None, help=(
        "also write the continuations as JSON lines; an existing file there is replaced only when it holds "
        "earlier generations (or is empty), any other is refused and kept"))
    return parser


def main(argv: list[str] | None = None) -> None:
    """``cvfp generate MODEL --prompt TEXT [...]``."""
    from cvfp_lightning.export import load_model, read_with_cache

    cfg = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p, cfg.max_new_tokens, prefix="--")
    prompts = read_prompts(cfg.prompt, cfg.prompt_file, names=("--prompt", "--prompt_file"))
    check(len(prompts) > 0, "no prompt: pass --prompt \"Some text\" or --prompt_file prompts.txt (- for stdin).")
    if cfg.out:
        check_output_file(cfg.out, "--out", is_generations, EARLIER)
    model = load_model(cfg.model, cfg.tokenizer)
    read_with_cache(model, **cfg.continuous_cache.as_dict())
    records = generate(model, prompts, cfg.max_new_tokens, cfg.greedy, cfg.temperature, cfg.top_k, cfg.top_p,
                       cfg.seed)
    for g in records:
        print(f"--- prompt: {g['prompt']!r} ({g['new_tokens']} new tokens)\n{g['prompt']}{g['continuation']}\n",
              flush=True)
    if cfg.out:
        write_output("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in records), cfg.out, "--out",
                     is_generations, EARLIER, note="; the continuations are printed above")

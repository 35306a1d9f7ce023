"""Repeated-phrase data for repetition CVFP training (seed document: repetition-training).

A phrase is tokenised once into its *unit* ``u`` (``L = len(u)`` ids, the cycle length as
the tokenizer sees it, not the word count) and repeated: ``ids = (u * repetitions)[:max_length]``.
The sequence is exactly periodic with period L, so ``ctx[t] ~ ctx[t - L]`` is the fixed
point the training asks for.

Batches (:func:`collate_repeated`) are plain dicts, right-padded with id 0:

- ``input_ids (B, T)`` int64, ``mask (B, T)`` bool (True = real token),
- ``targets (B, T)`` the next id of the same sequence, -100 at pads and the last position,
- ``cycle_length (B,)`` L of each row, ``index (B,)`` the row's phrase (or token) index,
- ``stage (B,)`` the stage the row belongs to.

:class:`RepeatedPhraseDataModule` serves stage s (phrases of s words) during epochs
``[(s - 1) * epochs_per_stage, s * epochs_per_stage)``, the last stage after that.
"""

from __future__ import annotations

import logging

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from cvfp_lightning.data.sequences import IGNORE_INDEX, shuffled_sampler
from cvfp_lightning.data.tokenizer import load_tokenizer
from cvfp_lightning.errors import check, check_positive

log = logging.getLogger(__name__)

# Ten phrases of five words in the research script's "red" / "red apple" / "red apple tree" style:
# stage s uses the first s words of each.
DEFAULT_PHRASES = [
    "red apple tree falls down",
    "blue sky cloud moves slowly",
    "green grass hill looks calm",
    "big cat runs very fast",
    "small dog eats warm food",
    "cold river water flows south",
    "white bird flies over mountains",
    "black fish swims in lakes",
    "yellow sun shines every morning",
    "hot tea cup sits here",
]


def repeat_unit(unit: list[int], repetitions: int, max_length: int) -> Tensor:
    """``(unit * repetitions)[:max_length]`` as an int64 tensor ``(T,)``."""
    return torch.tensor((unit * repetitions)[:max_length], dtype=torch.long)


def collate_repeated(items: list[dict]) -> dict[str, Tensor]:
    """Right-pad items ``{"ids": (T_i,), "cycle_length", "index", "stage"}`` into a batch (see module doc)."""
    B = len(items)
    T = max(1, max(int(item["ids"].numel()) for item in items))  # a batch of padding items has 1 column
    input_ids = torch.zeros(B, T, dtype=torch.long)
    targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for row, item in enumerate(items):
        ids = item["ids"]
        n = ids.numel()
        input_ids[row, :n] = ids
        targets[row, :max(n - 1, 0)] = ids[1:]
        mask[row, :n] = True
    return {"input_ids": input_ids, "targets": targets, "mask": mask,
            "cycle_length": torch.tensor([int(item["cycle_length"]) for item in items]),
            "index": torch.tensor([int(item["index"]) for item in items]),
            "stage": torch.tensor([int(item.get("stage", 1)) for item in items])}


class RepeatedIdsDataModule(L.LightningDataModule):
    """Base class: the tokenizer, the repetition settings and the batch layout.

    Args:
        tokenizer: HF hub name, local folder, or None for the bundled tokenizer.
        repetitions: how many times each unit is repeated (>= 2: one cycle has nothing
            to be compared with).
        max_length: sequences are cut to this many ids.
        batch_size: sequences per batch.
        num_workers: DataLoader workers.
        trust_remote_code: passed to the tokenizer loader; off by default.
    """

    def __init__(self, tokenizer: str | None = None, repetitions: int = 100, max_length: int = 512,
                 batch_size: int = 8, num_workers: int = 0, trust_remote_code: bool = False):
        super().__init__()
        check(isinstance(repetitions, int) and repetitions >= 2,
              f"data.repetitions={repetitions!r} is invalid: expected an integer >= 2 (a phrase must repeat at "
              "least twice for ctx[t] to be compared with ctx[t - L]); the research script used 30-100.")
        check(isinstance(max_length, int) and max_length >= 2,
              f"data.max_length={max_length!r} is invalid: expected an integer >= 2.")
        check_positive("data.batch_size", batch_size)
        check_positive("data.num_workers", num_workers, allow_zero=True)
        self.tokenizer_name = tokenizer
        self.repetitions, self.max_length = repetitions, max_length
        self.batch_size, self.num_workers = batch_size, num_workers
        self.tokenizer = load_tokenizer(tokenizer, trust_remote_code=trust_remote_code)
        self.vocab_size: int = len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def make_item(self, unit: list[int], index: int, stage: int = 1, what: str = "unit") -> dict:
        """The repeated sequence of ``unit`` with its cycle length; checks that two cycles fit."""
        check(2 * len(unit) <= self.max_length,
              f"{what} is {len(unit)} tokens long, so data.max_length={self.max_length} holds less than two "
              f"cycles: raise max_length to at least {2 * len(unit)} or use a shorter phrase.")
        return {"ids": repeat_unit(unit, self.repetitions, self.max_length), "cycle_length": len(unit),
                "index": index, "stage": stage}

    def _loader(self, items: list[dict], shuffle: bool) -> DataLoader:
        """Batches of ``items``, padded with empty items (index -1, no positions) to a
        multiple of the DDP world size instead of the DistributedSampler's duplicates, and
        put last in a shuffled order (:func:`~cvfp_lightning.data.sequences.shuffled_sampler`),
        so W ranks with ``batch_size`` B train on the global batches of one process with W*B."""
        world = self.trainer.world_size if self.trainer is not None else 1
        pad = {"ids": torch.zeros(0, dtype=torch.long), "cycle_length": 1, "index": -1,
               "stage": items[0].get("stage", 1) if items else 1}
        padded = items + [pad] * (-len(items) % world)
        return DataLoader(padded, batch_size=self.batch_size, collate_fn=collate_repeated,
                          sampler=shuffled_sampler(len(items), len(padded), self.trainer) if shuffle else None,
                          num_workers=self.num_workers)


class RepeatedPhraseDataModule(RepeatedIdsDataModule):
    """Staged repetition data: stage s = the first s words of every vocabulary phrase.

    The research script's CLI parameters map to ``max_stage``, ``epochs_per_stage``, ``repetitions``,
    ``batch_size`` and ``max_length`` here. The stage of an epoch is
    ``min(max_stage, 1 + epoch // epochs_per_stage)``; the dataloader is rebuilt every
    epoch, so the Trainer needs ``reload_dataloaders_every_n_epochs: 1`` when
    ``max_stage > 1`` (a clear error says so otherwise).

    Args:
        vocabulary: phrases (or single words when ``max_stage`` is 1); each needs at
            least ``max_stage`` words. None: :data:`DEFAULT_PHRASES`.
        separator: text put before each repetition of a phrase when tokenising its unit.
            ``""`` (the seed) repeats the phrase's own ids; ``" "`` uses the ids the
            phrase has in running text (``" red apple"``), which byte-level BPEs split
            differently.
        max_stage: the last stage (>= 1).
        epochs_per_stage: epochs spent on each stage (>= 1).
        phrases_per_stage: use only the first N phrases of the vocabulary; None: all.
        shuffle: shuffle the phrases of a stage each epoch.
        **kwargs: see :class:`RepeatedIdsDataModule`.
    """

    def __init__(self, vocabulary: list[str] | None = None, separator: str = "", max_stage: int = 3,
                 epochs_per_stage: int = 10, phrases_per_stage: int | None = None, shuffle: bool = True, **kwargs):
        check(isinstance(max_stage, int) and max_stage >= 1,
              f"data.max_stage={max_stage!r} is invalid: expected an integer >= 1 (stage 1 = one-word phrases).")
        check(isinstance(epochs_per_stage, int) and epochs_per_stage >= 1,
              f"data.epochs_per_stage={epochs_per_stage!r} is invalid: expected an integer >= 1.")
        if phrases_per_stage is not None:
            check_positive("data.phrases_per_stage", phrases_per_stage)
        super().__init__(**kwargs)
        vocabulary = list(DEFAULT_PHRASES if vocabulary is None else vocabulary)
        check(len(vocabulary) > 0, "data.vocabulary is empty: give at least one phrase, or null for the default.")
        if phrases_per_stage is not None:
            vocabulary = vocabulary[:phrases_per_stage]
        self.vocabulary, self.separator = vocabulary, separator
        self.max_stage, self.epochs_per_stage, self.shuffle = max_stage, epochs_per_stage, shuffle
        # every stage is built (and checked) now, so a bad phrase fails before training starts
        self.stages: dict[int, list[dict]] = {s: self._build_stage(s) for s in range(1, max_stage + 1)}

    def phrases(self, stage: int) -> list[str]:
        """The phrases of ``stage``: the first ``stage`` words of each vocabulary entry."""
        out = []
        for entry in self.vocabulary:
            words = str(entry).split()
            check(len(words) > 0, f"data.vocabulary entry {entry!r} is empty, so it tokenises to no ids: remove it.")
            check(len(words) >= stage,
                  f"data.vocabulary entry {entry!r} has {len(words)} word(s) but stage {stage} needs {stage} "
                  f"(data.max_stage={self.max_stage}): give phrases of at least max_stage words or lower max_stage.")
            out.append(" ".join(words[:stage]))
        return out

    def _build_stage(self, stage: int) -> list[dict]:
        items = []
        for i, phrase in enumerate(self.phrases(stage)):
            unit = self.encode(self.separator + phrase)
            check(len(unit) > 0, f"data.vocabulary phrase {phrase!r} tokenises to no ids with this tokenizer: "
                                 "remove it or use another tokenizer.")
            items.append(self.make_item(unit, i, stage, what=f"phrase {phrase!r}"))
        return items

    def cycle_lengths(self, stage: int) -> list[int]:
        """L of every phrase of ``stage``, in tokenizer ids."""
        return [item["cycle_length"] for item in self.stages[stage]]

    def stage_for_epoch(self, epoch: int) -> int:
        return min(self.max_stage, 1 + int(epoch) // self.epochs_per_stage)

    @property
    def current_stage(self) -> int:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return self.stage_for_epoch(epoch)

    def train_dataloader(self) -> DataLoader:
        if self.trainer is not None and self.max_stage > 1:
            check(self.trainer.reload_dataloaders_every_n_epochs == 1,
                  f"RepeatedPhraseDataModule changes stage every {self.epochs_per_stage} epochs, but "
                  f"trainer.reload_dataloaders_every_n_epochs={self.trainer.reload_dataloaders_every_n_epochs}: "
                  "set trainer.reload_dataloaders_every_n_epochs: 1 (or data.max_stage: 1).")
            needed, epochs = self.max_stage * self.epochs_per_stage, self.trainer.max_epochs
            if self.trainer.current_epoch == 0 and epochs is not None and 0 <= epochs < needed:
                last = self.stage_for_epoch(max(epochs - 1, 0))
                skipped = (f"stage {self.max_stage} is" if last + 1 == self.max_stage
                           else f"stages {last + 1} to {self.max_stage} are")
                rank_zero_warn(f"trainer.max_epochs={epochs} ends in stage {last} of data.max_stage={self.max_stage} "
                               f"({self.epochs_per_stage} epochs each): {skipped} never trained; give "
                               f"trainer.max_epochs {needed} for all of them.")
        stage = self.current_stage
        log.info("stage %d: %d phrases, cycle lengths %s", stage, len(self.stages[stage]), self.cycle_lengths(stage))
        return self._loader(self.stages[stage], shuffle=self.shuffle)

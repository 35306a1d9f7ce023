"""``CarryBest``: a resumed fit keeps the best checkpoint of the run it resumes, in its own folder."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L

from cvfp_lightning.errors import CVFPUserError
from cvfp_lightning.io import atomic_copy


def _moved(path: str, old_dir: Path, new_dir: str) -> str:
    """``path`` in ``new_dir`` when it lies in ``old_dir``, else as it is."""
    if path and Path(os.path.abspath(path)).parent == old_dir:
        return os.path.join(new_dir, Path(path).name)
    return path


class CarryBest(L.Callback):
    """On ``fit --ckpt_path``, carry every monitored ``ModelCheckpoint``'s best into the new run.

    A resumed run logs into a new ``version_N`` folder, so its checkpoint folder is not the
    one recorded in the checkpoint, and Lightning's ``ModelCheckpoint.load_state_dict`` then
    drops ``best_model_score`` and ``best_k_models`` ("dirpath has changed"): the first
    validation after the resume would become the best, whatever the earlier epochs scored.
    Before the callbacks' states are loaded, this copies the best files the state records
    (``best_k_models``: ``best.ckpt`` in the shipped configs; rank 0, atomically) from the
    earlier run's folder into the new one and rewrites the state to point there, so Lightning
    restores all of it: the best score, and the best weights that ``RunSummary`` loads back
    at the end of fit are the uninterrupted run's. Nothing is written into the earlier run's
    folder, and Lightning only ever removes files in its own ``dirpath``. A checkpoint without
    a monitor (Phase 1) has no best to carry: its state is restored pointing at no file of the
    earlier run. ``cvfp`` adds it to every run.
    """

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn != "fit":  # validate / test / predict write no checkpoints
            return
        states = checkpoint.get("callbacks") or {}
        carried = False
        for callback in trainer.checkpoint_callbacks:
            state = states.get(callback.state_key)
            if not (isinstance(state, dict) and state.get("dirpath") and callback.dirpath
                    and state["dirpath"] != callback.dirpath):
                continue
            states[callback.state_key] = self._carried(state, str(callback.dirpath), trainer.is_global_zero)
            carried = True
        if carried:
            trainer.strategy.barrier("CarryBest")

    @staticmethod
    def _carried(state: dict, new_dir: str, copy: bool) -> dict:
        """``state`` pointing into ``new_dir``, its best files copied there from its ``dirpath`` (when ``copy``)."""
        old_dir = Path(os.path.abspath(state["dirpath"]))
        if old_dir == Path(os.path.abspath(new_dir)):  # the same folder, spelt otherwise
            return {**state, "dirpath": new_dir}
        if not state.get("monitor"):  # no best: this run's newest checkpoint replaces none of the earlier run's
            return {**state, "dirpath": new_dir, "best_model_path": "", "best_k_models": {},
                    "kth_best_model_path": "", "last_model_path": ""}
        best_k = {}
        for path, score in (state.get("best_k_models") or {}).items():
            target = _moved(path, old_dir, new_dir)
            # checked on every rank (each reads the resumed checkpoint, so the files are shared): a rank that
            # raised alone would leave the others waiting at the barrier
            if target != path and not os.path.isfile(path):
                raise CVFPUserError(f"--ckpt_path: the run being resumed records {path} as a best checkpoint "
                                    f"({state['monitor']} = {float(score):.4f}) but the file is missing, so the "
                                    "resumed run cannot keep its best weights: put the file back.")
            if copy and target != path:
                atomic_copy(path, target)
            best_k[target] = score
        return {**state, "dirpath": new_dir, "best_k_models": best_k,
                "best_model_path": _moved(state.get("best_model_path") or "", old_dir, new_dir),
                "kth_best_model_path": _moved(state.get("kth_best_model_path") or "", old_dir, new_dir),
                "last_model_path": ""}  # this run writes its own last.ckpt

"""``TopKReport``: the Top-K table as CSV, JSON, Markdown and TensorBoard text."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from cvfp_lightning.callbacks.figures import log_figure, topk_loss_figure, wants_figures
from cvfp_lightning.io import atomic_write_csv, atomic_write_json

log = logging.getLogger(__name__)

COLUMNS = ["token_id", "token_text", "initial_loss", "final_loss", "improvement_pct", "converged", "seconds"]


class TopKReport(L.Callback):
    """When a Top-K run (:class:`~cvfp_lightning.modules.topk.TopKBase`) ends, write its table.

    Into ``trainer.log_dir`` (or ``default_root_dir`` without a logger), on rank 0:
    ``topk_results.csv`` (one row per token, :data:`COLUMNS`), ``topk_summary.json`` (the
    module's ``summary()``), the Markdown table as TensorBoard text ``topk/results`` and the
    figure ``figures/topk_losses`` (initial and final loss per token, log y, with the
    ``converged_below`` line). ``cvfp`` adds it to every Top-K model.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.is_global_zero or not getattr(pl_module, "records", None):
            return
        rows, summary = pl_module.rows(), pl_module.summary()
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        path = atomic_write_csv([{**r, "initial_loss": f"{r['initial_loss']:.6g}", "final_loss": f"{r['final_loss']:.6g}",
                                  "improvement_pct": f"{r['improvement_pct']:.2f}", "seconds": f"{r['seconds']:.4f}"}
                                 for r in rows], COLUMNS, folder / "topk_results.csv")
        atomic_write_json(summary, folder / "topk_summary.json")
        text = markdown(rows, summary)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("topk/results", text, trainer.global_step)
        if wants_figures(trainer):
            fig = topk_loss_figure([f"{r['token_id']} {r['token_text']!r}"[:16] for r in rows],
                                   [r["initial_loss"] for r in rows], [r["final_loss"] for r in rows],
                                   pl_module.hparams.converged_below,
                                   f"top-k {summary['schedule']}: {summary['converged']}/{summary['tokens']} converged")
            log_figure(trainer, "figures/topk_losses", fig, trainer.global_step)
        log.info("top-k %s: %d/%d converged, mean final loss %.3g, attractor distance %.3g (init %.3g) -> %s",
                 summary["schedule"], summary["converged"], summary["tokens"], summary["mean_final_loss"],
                 summary["attractor_distance"], summary["attractor_distance_init"], path)


def markdown(rows: list[dict], summary: dict) -> str:
    """The table and a summary line, as Markdown."""
    lines = ["| token id | token | initial loss | final loss | improvement % | converged | seconds |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        token = repr(r["token_text"]).replace("|", "\\|")
        lines.append(f"| {r['token_id']} | `{token}` | {r['initial_loss']:.6f} | {r['final_loss']:.6f} | "
                     f"{r['improvement_pct']:.1f} | {'yes' if r['converged'] else 'no'} | {r['seconds']:.3f} |")
    lines.append("")
    lines.append(f"**{summary['schedule']}**: {summary['converged']}/{summary['tokens']} converged, mean "
                 f"improvement {summary['mean_improvement']:.1f}%, mean final loss {summary['mean_final_loss']:.3g}. "
                 f"Attractor distance {summary['attractor_distance']:.4g} (before training "
                 f"{summary['attractor_distance_init']:.4g}; mean context norm {summary['context_norm']:.3g}), "
                 f"cosine {summary['attractor_cosine']:.4f}.")
    return "\n".join(lines)

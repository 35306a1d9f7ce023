"""The TensorBoard figures of the callbacks: matplotlib ``Figure`` objects drawn off-screen.

Each ``*_figure`` function returns a :class:`matplotlib.figure.Figure` (no pyplot state, no
display needed: TensorBoard's ``add_figure`` renders it with Agg). :func:`log_figure` sends
one to every TensorBoard logger of a trainer, on rank 0; the callbacks draw only when
:func:`wants_figures` says a TensorBoard logger will take it. Tags are ``figures/<name>``,
so TensorBoard's Images tab shows them as one group.
"""

from __future__ import annotations

import math
from typing import Sequence

import lightning as L
from matplotlib.figure import Figure
from torch import Tensor


def wants_figures(trainer: L.Trainer) -> bool:
    """Rank 0 with at least one logger that takes figures (TensorBoard's ``add_figure``)."""
    if not trainer.is_global_zero:
        return False
    return any(callable(getattr(getattr(logger, "experiment", None), "add_figure", None)) for logger in trainer.loggers)


def log_figure(trainer: L.Trainer, tag: str, figure: Figure, step: int) -> None:
    """``add_figure(tag, figure, step)`` on every TensorBoard logger (rank 0); the figure is closed after."""
    for logger in trainer.loggers:
        add = getattr(getattr(logger, "experiment", None), "add_figure", None)
        if callable(add):
            add(tag, figure, global_step=step, close=False)
    figure.clear()


def _figure(width: float = 6.4, height: float = 4.0) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), dpi=100)
    return fig, fig.subplots()


# Margins (figure fractions) of the figures drawn every epoch: fixed, as matplotlib's
# tight_layout measures every text first and costs several times the drawing itself
MARGINS = {"left": 0.14, "right": 0.97, "bottom": 0.12, "top": 0.92}


def _finish(fig: Figure, ax, xlabel: str, ylabel: str, title: str, grid: str = "both",
            right: float = MARGINS["right"], fit_texts: bool = False) -> Figure:
    """Labels, title, grid (``grid``: axis) and legend of a one-axes figure in the fixed
    :data:`MARGINS` (``right``: another right margin, as for a second y axis); ``fit_texts``
    lays it out to fit its texts (tight_layout) instead, for labels of any length."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis=grid, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    if fit_texts:
        fig.tight_layout()
    else:
        fig.subplots_adjust(**{**MARGINS, "right": right})
    return fig


def spectrum_figure(s: Tensor, title: str) -> Figure:
    """Normalised singular values ``s_i / sum(s)`` (log y) against their index i = 1..D (descending).

    The dotted line is ``1/D``, the level of a flat spectrum (full effective rank).
    """
    s = s.detach().double().cpu()
    p = (s / s.sum()).clamp_min(1e-300)
    fig, ax = _figure()
    ax.semilogy(range(1, len(p) + 1), p.tolist(), ".-", markersize=3, linewidth=1)
    ax.axhline(1.0 / len(p), color="grey", linestyle=":", linewidth=1, label=f"flat spectrum 1/D = 1/{len(p)}")
    return _finish(fig, ax, "index i (largest first)", "s_i / sum(s)", title)


def residual_figure(counts: Tensor, edges: Tensor, threshold: float, title: str) -> Figure:
    """Share of positions per residual bin (log x) with the convergence threshold as a red line.

    ``counts (bins,)`` over ``edges (bins + 1,)`` (residual values, increasing); the first and
    last bin also hold the residuals below and above the range.
    """
    counts, edges = counts.detach().double().cpu(), edges.detach().double().cpu()
    total = float(counts.sum())
    share = (100.0 * counts / max(total, 1.0)).tolist()
    converged = float(counts[edges[1:] <= threshold * (1 + 1e-9)].sum()) / max(total, 1.0)
    fig, ax = _figure()
    ax.stairs(share, edges.tolist(), fill=True, alpha=0.6)
    ax.axvline(threshold, color="red", linestyle="--", linewidth=1.5,
               label=f"threshold {threshold:g}: {100 * converged:.1f}% of {total:,.0f} below")
    ax.set_xscale("log")
    return _finish(fig, ax, "residual: per-dimension MSE between new and previous context", "% of positions", title)


def curve_figure(history: Sequence[dict], best_epoch: int | None, title: str) -> Figure:
    """``val/ppl`` (log y) against epoch, the best epoch dotted; the right axis reads it as ``val/bpb``.

    On one validation text ``bpb = r * log2(ppl)`` with ``r`` = tokens / UTF-8 bytes, the
    same at every epoch, so one curve carries both (``r`` from the last epoch's pair).
    """
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator, NullFormatter

    rows = [r for r in history if "val/ppl" in r]
    epochs, ppl = [r["epoch"] for r in rows], [r["val/ppl"] for r in rows]
    fig, ax = _figure()
    ax.plot(epochs, ppl, "o-", color="C0", label="val PPL")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    last = rows[-1] if rows else {}
    ratio = last.get("val/bpb", math.nan) / math.log2(last["val/ppl"]) if last.get("val/ppl", 0) > 1 else math.nan
    second_axis = math.isfinite(ratio) and ratio > 0
    if second_axis:
        import numpy as np

        right = ax.secondary_yaxis("right", functions=(lambda p: ratio * np.log2(np.maximum(p, 1e-300)),
                                                       lambda b: np.exp2(b / ratio)))
        right.set_ylabel("val bits per byte")
        right.yaxis.set_major_locator(MaxNLocator(6))
        right.yaxis.set_major_formatter(FormatStrFormatter("%.3f"))
        right.yaxis.set_minor_formatter(NullFormatter())
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
    return _finish(fig, ax, "epoch", "val PPL", title, right=0.87 if second_axis else MARGINS["right"])


def topk_loss_figure(labels: Sequence[str], initial: Sequence[float], final: Sequence[float], threshold: float,
                     title: str) -> Figure:
    """Initial and final cyclic loss per token as paired bars (log y), the converged-below line in red."""
    k = len(labels)
    fig, ax = _figure(width=min(max(6.4, 0.35 * k + 2), 20.0), height=4.0)
    floor = 1e-12  # a loss of exactly 0 still gets a visible bar on the log axis
    ax.bar([i - 0.2 for i in range(k)], [max(v, floor) for v in initial], width=0.4, label="initial loss", color="C0")
    ax.bar([i + 0.2 for i in range(k)], [max(v, floor) for v in final], width=0.4, label="final loss", color="C2")
    ax.axhline(threshold, color="red", linestyle="--", linewidth=1.5, label=f"converged below {threshold:g}")
    ax.set_yscale("log")
    if k <= 64:  # more labels would overlap: then the axis counts tokens
        ax.set_xticks(list(range(k)))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
    return _finish(fig, ax, "token", "cyclic loss", title, grid="y", fit_texts=True)  # once a run

"""torchmetrics Metrics of CVFP training (synced across DDP ranks by torchmetrics).

- :class:`ConvergenceRate`: share of rows whose residual (per-dimension MSE) is below
  a threshold.
- :class:`EffectiveRank`: Roy & Vetterli effective rank of the *uncentred* context matrix,
  ``p = s / sum(s)`` over its singular values, ``ER = exp(-sum p ln p)``, on at most
  ``max_rows`` rows sampled with a fixed RNG seed; ``percent=True`` reports ``100 ER / D``.
- :class:`ResidualHistogram`: counts of residuals in fixed log-spaced bins around a threshold
  (the distribution behind the convergence rate, in O(bins) memory).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


class ConvergenceRate(Metric):
    """``#(residual < threshold) / #rows``; ``update(residual (n,))``."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, threshold: float, **kwargs):
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.add_state("converged", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, residual: Tensor) -> None:
        residual = residual.detach().reshape(-1)
        self.converged += (residual < self.threshold).sum().to(torch.float64)
        self.total += residual.numel()

    def compute(self) -> Tensor:
        return (self.converged / self.total.clamp_min(1.0)).float()


class ResidualHistogram(Metric):
    """Counts of residuals (per-dimension MSE) in fixed log10 bins; ``update(residual (n,))``.

    ``bins_per_decade`` bins per decade from ``threshold * 10**-decades_below`` to
    ``threshold * 10**decades_above``, so the threshold is a bin edge and the bins left of it
    hold exactly the residuals below it (up to rounding of log10); residuals outside the range
    (0 and NaN included) count in the first / last bin. ``compute()`` returns ``counts
    (bins,)`` float64, summed over batches and DDP ranks; :attr:`edges` are the ``bins + 1``
    bin edges in residual units. Memory: the counts only, O(bins) (110 bins: 880 bytes),
    never the residuals.
    """

    full_state_update = False

    def __init__(self, threshold: float, decades_below: int = 8, decades_above: int = 3, bins_per_decade: int = 10,
                 **kwargs):
        super().__init__(**kwargs)
        self.threshold, self.below, self.above = float(threshold), int(decades_below), int(decades_above)
        self.per_decade = int(bins_per_decade)
        self.bins = (self.below + self.above) * self.per_decade
        self.add_state("counts", default=torch.zeros(self.bins, dtype=torch.float64), dist_reduce_fx="sum")

    @property
    def edges(self) -> Tensor:
        """``(bins + 1,)`` float64 bin edges in residual units, increasing."""
        return self.threshold * 10.0 ** torch.linspace(-self.below, self.above, self.bins + 1, dtype=torch.float64)

    def update(self, residual: Tensor) -> None:
        decades = torch.log10(residual.detach().reshape(-1).double().clamp_min(1e-300)) - math.log10(self.threshold)
        decades = decades.nan_to_num(nan=float(self.above))
        idx = ((decades + self.below) * self.per_decade).floor().clamp(0, self.bins - 1).long()
        self.counts += torch.bincount(idx, minlength=self.bins).to(self.counts)

    def compute(self) -> Tensor:
        return self.counts.clone()


def singular_values(matrix: Tensor) -> Tensor:
    """Singular values of ``matrix (n, D)``, descending, in float64.

    Through the eigenvalues of the smaller Gram matrix (``X^T X`` or ``X X^T``) in float64:
    the same values as an SVD to ~1e-12 relative, in about half the time for n >> D.
    """
    x = matrix.double()
    gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)


def spectrum_rank(s: Tensor) -> Tensor:
    """Roy-Vetterli effective rank of singular values ``s``: ``exp(-sum p ln p)``, ``p = s / sum(s)`` (0 if all 0)."""
    s = s.double()
    total = s.sum()
    if total <= 0:
        return torch.tensor(0.0)
    p = s / total
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum()).float()


def effective_rank(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Roy-Vetterli effective rank of ``matrix (n, D)`` (uncentred). Returns (ER, singular values)."""
    s = singular_values(matrix)
    return spectrum_rank(s), s.float()


def sample_rows(rows: Tensor, max_rows: int, seed: int = 0) -> Tensor:
    """At most ``max_rows`` rows of ``rows (n, D)``, in order, drawn by ``randperm`` with ``seed`` (the same on every rank)."""
    if rows.shape[0] <= max_rows:
        return rows
    return rows[sample_positions(rows.shape[0], max_rows, seed).to(rows.device)]


class EffectiveRank(Metric):
    """Effective rank of the rows given to ``update(contexts (n, D))`` (all ranks gathered).

    ``compute`` samples at most ``max_rows`` rows (``torch.randperm`` seeded by ``seed``,
    the same on every rank) and returns ER, or ``100 ER / D`` with ``percent``.
    The singular values of the last compute stay in ``last_singular_values``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, max_rows: int = 10_000, seed: int = 0, percent: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.max_rows, self.seed, self.percent = int(max_rows), int(seed), percent
        self.add_state("rows", default=[], dist_reduce_fx="cat")
        self.last_singular_values: Tensor | None = None

    def update(self, contexts: Tensor) -> None:
        self.rows.append(contexts.detach().float().reshape(-1, contexts.shape[-1]))

    def compute(self) -> Tensor:
        rows = sample_rows(dim_zero_cat(self.rows), self.max_rows, self.seed)
        er, s = effective_rank(rows.cpu())
        self.last_singular_values = s
        value = 100.0 * er / rows.shape[1] if self.percent else er
        return value.to(self.device)


def sample_positions(num_rows: int, max_rows: int, seed: int = 0) -> Tensor:
    """The positions :func:`sample_rows` keeps of ``num_rows`` rows, sorted ``(min(n, max_rows),)`` int64."""
    if num_rows <= max_rows:
        return torch.arange(num_rows)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_rows, generator=g)[:max_rows].sort().values


class GramEffectiveRank(Metric):
    """Effective rank of sampled rows from their summed Gram matrix ``X^T X (D, D)`` (float64).

    ``update(rows (k, D))`` adds ``rows^T rows``; the Gram is summed over DDP ranks, so each
    rank passes only its own rows of a position-determined sample
    (:func:`sample_positions` over the global positions) and what crosses ranks is O(D^2),
    whatever N. The eigenvalues of the Gram are the squared singular values of the sampled
    matrix, so the value equals :class:`EffectiveRank`'s on the same rows. Memory: 8 D^2 bytes.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, dim: int, percent: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.percent = int(dim), percent
        self.add_state("gram", default=torch.zeros(self.dim, self.dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rows", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.last_singular_values: Tensor | None = None

    def update(self, rows: Tensor) -> None:
        x = rows.detach().double().reshape(-1, self.dim)
        self.gram += x.T @ x
        self.rows += x.shape[0]

    def compute(self) -> Tensor:
        s = torch.linalg.eigvalsh(self.gram.cpu()).clamp_min(0).sqrt().flip(0)
        self.last_singular_values = s.float()
        er = spectrum_rank(s)
        return (100.0 * er / self.dim if self.percent else er).to(self.device)


def next_token_stats(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor]:
    """Summed next-token statistics of ``logits (..., V)`` against ``targets (...)``.

    Returns ``(nll_sum, correct, count)``: the summed cross-entropy in nats, the number of
    top-1 hits and the number of predicted tokens (targets equal to ``ignore_index`` do not
    count). The mean loss of the batch is ``nll_sum / max(count, 1)``.
    """
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    nll_sum = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
    keep = targets != ignore_index
    correct = ((logits.argmax(dim=-1) == targets) & keep).sum()
    return nll_sum, correct, keep.sum()


class NextTokenMetric(Metric):
    """Token-weighted language-model metric, summed over batches and DDP ranks.

    ``update(nll_sum, correct, count)`` with the output of :func:`next_token_stats`;
    ``compute`` by ``output``:

    - ``loss``: ``nll_sum / count`` (mean cross-entropy, nats per token)
    - ``ppl``: ``exp(nll_sum / count)`` (perplexity)
    - ``acc``: ``correct / count`` (top-1 accuracy)
    - ``bpb``: ``nll_sum / (ln 2 * num_bytes)``: bits per UTF-8 byte of the evaluated
      text (comparable across tokenizers); NaN when ``num_bytes`` is 0 (no text).
    """

    full_state_update = False
    OUTPUTS = ("loss", "ppl", "acc", "bpb")

    def __init__(self, output: str = "loss", num_bytes: int = 0, **kwargs):
        super().__init__(**kwargs)
        if output not in self.OUTPUTS:
            raise ValueError(f"NextTokenMetric output={output!r}: expected one of {self.OUTPUTS}")
        self.output, self.num_bytes = output, int(num_bytes)
        for name in ("nll_sum", "correct", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, nll_sum: Tensor, correct: Tensor, count: Tensor) -> None:
        self.nll_sum += nll_sum.detach().to(torch.float64)
        self.correct += torch.as_tensor(correct, device=self.device).to(torch.float64)
        self.count += torch.as_tensor(count, device=self.device).to(torch.float64)

    def compute(self) -> Tensor:
        count = self.count.clamp_min(1.0)
        if self.output == "loss":
            value = self.nll_sum / count
        elif self.output == "ppl":
            value = torch.exp(self.nll_sum / count)
        elif self.output == "acc":
            value = self.correct / count
        else:
            value = (self.nll_sum / (math.log(2.0) * self.num_bytes) if self.num_bytes > 0
                     else torch.tensor(float("nan"), dtype=torch.float64, device=self.device))
        return value.float()

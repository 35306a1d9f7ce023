"""Context updaters: the one update rule ``context_new = f(context, token_embed)``.

Every caller (Phase 1 training in both modes, validation, the Phase 2 cache, generation,
repetition training and every diagnostic) goes through
:meth:`ContextUpdater.update_context_one_step`. Nothing else in the package computes a
context.

Shapes: ``context`` is ``(..., context_dim)``, ``token_embed`` is ``(..., embed_dim)``
with the same leading dimensions; the result is ``(..., context_dim)``. Leading dimensions
are arbitrary: a sequential pass calls it with ``(B, D)`` per time step, a parallel Phase 1
iteration with ``(N, D)`` for all N positions at once.

Updaters (``ContextConfig.updater``):

``residual`` (the research code's default). Per layer
    ``x_{l+1} = LN(r(x_l) + ReLU(W_l [x_l; e] + b_l))`` when ``token_input_all_layers``
    (all layers ``context_dim`` wide, ``r`` the identity), otherwise only layer 0 sees the
    token: ``x_0 = [c; e]``, ``x_{l+1} = LN(r_l(x_l) + ReLU(W_l x_l + b_l))`` with widths
    shrinking arithmetically from ``context_dim + embed_dim`` to ``context_dim`` and ``r_l``
    a bias-free Linear where widths differ. Init: weights N(0, init_std), biases
    N(0, bias_std) (0.1 / 0.01).
``gated`` (Phase 1 specification). ``h = FNN([e; c])``,
    ``c <- LN(sigmoid(W_f h) * c + sigmoid(W_i h) * tanh(W_d h))``. ``stacking=sequential``:
    a deep FNN (``num_layers`` Linear+ReLU) then one gated update; ``layerwise``: one
    Linear+ReLU and one gated update in every layer.
``simple`` (repetition document). ``c <- clamp(LN(tanh(W FNN([e; c]))), -10, 10)``.

Every Linear over a concatenation with the token is a
:class:`~cvfp_lightning.models.layers.ConcatLinear` (``W [x; e] + b = W_x x + (W_e e + b)``):
the same function, no concatenated copy, no gradient for a frozen embedding, and the token's
share computed once per position (:meth:`ContextUpdater.token_terms`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvfp_lightning.errors import ConfigMixin, check, check_positive
from cvfp_lightning.models.layers import ConcatLinear

UpdaterName = Literal["residual", "gated", "simple"]
Stacking = Literal["sequential", "layerwise"]


@dataclass
class ContextConfig(ConfigMixin):
    """Shape of the context block.

    Args:
        updater: ``residual`` | ``gated`` | ``simple`` (see module docstring).
        context_dim: width D of the context vector.
        num_layers: layers of the block.
        hidden_dim: FNN width of ``gated`` and ``simple`` (``residual`` has none).
        token_input_all_layers: ``residual`` only: every layer sees the token embedding.
        stacking: ``gated`` only: ``sequential`` or ``layerwise``.
        init_std: std of the normal init of Linear weights.
        bias_std: std of the normal init of Linear biases.
    """

    _name = "context"  # for messages (a class attribute, not a field)
    updater: UpdaterName = "residual"
    context_dim: int = 768
    num_layers: int = 6
    hidden_dim: int = 512
    token_input_all_layers: bool = True
    stacking: Stacking = "layerwise"
    init_std: float = 0.1
    bias_std: float = 0.01

    def __post_init__(self) -> None:
        check(self.updater in ("residual", "gated", "simple"),
              f"context.updater={self.updater!r} is unknown: expected residual, gated or simple.")
        check(self.stacking in ("sequential", "layerwise"),
              f"context.stacking={self.stacking!r} is unknown: expected sequential or layerwise.")
        for name in ("context_dim", "num_layers", "hidden_dim"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool),
                  f"context.{name}={value!r} is invalid: expected an integer.")
            check_positive(f"context.{name}", value)
        check_positive("context.init_std", self.init_std, allow_zero=True)
        check_positive("context.bias_std", self.bias_std, allow_zero=True)


def _init_linear(layer: nn.Linear, init_std: float, bias_std: float) -> None:
    nn.init.normal_(layer.weight, 0.0, init_std)
    if layer.bias is not None:
        nn.init.normal_(layer.bias, 0.0, bias_std)


class ContextUpdater(nn.Module):
    """Base class of the context blocks.

    Attributes:
        context_dim: D, width of the context vector.
        embed_dim: E, width of the token embedding.
        layer_dims: width of each context output returned with ``return_all_layers``
            (the inputs of the Phase 2 token block, one per layer).
    """

    context_dim: int
    embed_dim: int
    layer_dims: list[int]

    def update_context_one_step(self, context: Tensor, token_embed: Tensor, return_all_layers: bool = False,
                                token_terms: list[Tensor] | None = None) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Apply the update once: ``(..., D), (..., E) -> (..., D)``.

        With ``return_all_layers`` also return the list of every layer's output
        (``(..., layer_dims[l])`` each); the last one is the new context.
        ``token_terms``: :meth:`token_terms` of ``token_embed`` (the token's share of every
        layer that sees the token), when the caller computed it for many positions or steps
        at once (a sequential pass, a fixed-point solve); the result is the same function of
        (context, token), and each call then multiplies only the context.
        """
        if context.shape[-1] != self.context_dim or token_embed.shape[-1] != self.embed_dim:
            raise ValueError(
                f"update_context_one_step got context {tuple(context.shape)} and token_embed "
                f"{tuple(token_embed.shape)}; expected last dims {self.context_dim} and {self.embed_dim}.")
        terms = self.token_terms(token_embed) if token_terms is None else token_terms
        layers = self._layers(context, token_embed, terms)
        return (layers[-1], layers) if return_all_layers else layers[-1]

    def forward(self, context: Tensor, token_embed: Tensor) -> Tensor:
        return self.update_context_one_step(context, token_embed)

    def token_terms(self, token_embed: Tensor) -> list[Tensor]:
        """``W_e e + b`` of every layer that sees the token: ``(..., E) -> [(..., out_k)]``."""
        return [lin.input_term(token_embed) for lin in self._token_linears()]

    def token_terms_width(self) -> int:
        """Floats per position that :meth:`token_terms` returns (to size blocks of steps)."""
        return sum(lin.out_features for lin in self._token_linears())

    def _token_linears(self) -> list[ConcatLinear]:  # pragma: no cover
        """The layers whose input contains the token (``[x; e]``), in :meth:`token_terms` order."""
        raise NotImplementedError

    def _layers(self, context: Tensor, token_embed: Tensor, terms: list[Tensor]) -> list[Tensor]:  # pragma: no cover
        raise NotImplementedError


class ResidualContextBlock(ContextUpdater):
    """``residual`` updater (see module docstring)."""

    def __init__(self, cfg: ContextConfig, embed_dim: int):
        super().__init__()
        self.context_dim, self.embed_dim = cfg.context_dim, embed_dim
        self.token_input_all_layers = cfg.token_input_all_layers
        D, E, L = cfg.context_dim, embed_dim, cfg.num_layers
        if cfg.token_input_all_layers:  # every layer: W [x; e] + b, x of width D
            out_dims = [D] * L
            self.linears = nn.ModuleList([ConcatLinear(D, E, D) for _ in range(L)])
            self.residuals = nn.ModuleList([nn.Identity() for _ in range(L)])
        else:  # layer 0 over [c; e], then plain layers of shrinking width
            start = D + E
            widths = [round(start + (D - start) * l / L) for l in range(L + 1)]
            in_dims, out_dims = widths[:-1], widths[1:]
            first_res: nn.Module = nn.Identity() if out_dims[0] == start else ConcatLinear(D, E, out_dims[0], bias=False)
            self.linears = nn.ModuleList([ConcatLinear(D, E, out_dims[0])]
                                         + [nn.Linear(i, o) for i, o in zip(in_dims[1:], out_dims[1:])])
            self.residuals = nn.ModuleList([first_res] + [nn.Identity() if i == o else nn.Linear(i, o, bias=False)
                                                          for i, o in zip(in_dims[1:], out_dims[1:])])
        self.norms = nn.ModuleList([nn.LayerNorm(o) for o in out_dims])
        self.layer_dims = list(out_dims)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _init_linear(module, cfg.init_std, cfg.bias_std)

    def legacy_renames(self) -> dict[str, tuple[str, str | None]]:
        """Checkpoints before ConcatLinear: one Linear over ``[x; e]`` (see models/legacy.py)."""
        renames = {f"linears.{l}": (f"linears.{l}", "state_first")
                   for l, lin in enumerate(self.linears) if isinstance(lin, ConcatLinear)}
        if isinstance(self.residuals[0], ConcatLinear):
            renames["residuals.0"] = ("residuals.0", "state_first")
        return renames

    def _token_linears(self) -> list[ConcatLinear]:
        if self.token_input_all_layers:
            return list(self.linears)
        return [self.linears[0]] + ([self.residuals[0]] if isinstance(self.residuals[0], ConcatLinear) else [])

    def _layers(self, context: Tensor, token_embed: Tensor, terms: list[Tensor]) -> list[Tensor]:
        outputs = []
        if self.token_input_all_layers:
            x = context
            for term, lin, norm in zip(terms, self.linears, self.norms):
                # the modules' forwards, called directly: this loop is the per-token step of a sequential pass
                x = F.layer_norm(x + F.relu(lin.forward(x, term)), norm.normalized_shape, norm.weight, norm.bias,
                                 norm.eps)
                outputs.append(x)
            return outputs
        for l, (res, lin, norm) in enumerate(zip(self.residuals, self.linears, self.norms)):
            if l == 0:  # only layer 0 sees the token: its input is [c; e]
                pre = lin(context, terms[0])
                skip = res(context, terms[1]) if isinstance(res, ConcatLinear) else torch.cat([context, token_embed], -1)
                x = norm(skip + F.relu(pre))
            else:
                x = norm(res(x) + F.relu(lin(x)))
            outputs.append(x)
        return outputs


class GatedUpdate(nn.Module):
    """``c <- LN(sigmoid(W_f h) * c + sigmoid(W_i h) * tanh(W_d h))``."""

    def __init__(self, hidden_dim: int, context_dim: int):
        super().__init__()
        self.gates = nn.Linear(hidden_dim, 3 * context_dim)  # W_f, W_i, W_d stacked
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, h: Tensor, context: Tensor) -> Tensor:
        f, i, d = self.gates(h).chunk(3, dim=-1)
        return self.norm(torch.sigmoid(f) * context + torch.sigmoid(i) * torch.tanh(d))


def _fnn(in_dim: int, hidden_dim: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(depth):
        layers += [nn.Linear(in_dim if k == 0 else hidden_dim, hidden_dim), nn.ReLU()]
    return nn.Sequential(*layers)


class GatedContextBlock(ContextUpdater):
    """``gated`` updater with ``sequential`` or ``layerwise`` stacking.

    Each gated update ``l`` has an input layer ``ReLU(W [c; e] + b)`` (``inputs[l]``), then
    ``hiddens[l]`` (the rest of the FNN: ``num_layers - 1`` Linear+ReLU for ``sequential``,
    none for ``layerwise``), then :class:`GatedUpdate`.
    """

    def __init__(self, cfg: ContextConfig, embed_dim: int):
        super().__init__()
        self.context_dim, self.embed_dim = cfg.context_dim, embed_dim
        D, E, H, L = cfg.context_dim, embed_dim, cfg.hidden_dim, cfg.num_layers
        self.stacking = cfg.stacking
        updates, depth = (1, L) if cfg.stacking == "sequential" else (L, 1)
        self.inputs = nn.ModuleList([ConcatLinear(D, E, H) for _ in range(updates)])
        self.hiddens = nn.ModuleList([_fnn(H, H, depth - 1) for _ in range(updates)])
        self.updates = nn.ModuleList([GatedUpdate(H, D) for _ in range(updates)])
        self.layer_dims = [D] * updates
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _init_linear(module, cfg.init_std, cfg.bias_std)

    def legacy_renames(self) -> dict[str, tuple[str, str | None]]:
        """Checkpoints before ConcatLinear: ``fnns[l]`` was one Sequential over ``[e; c]``."""
        renames: dict[str, tuple[str, str | None]] = {}
        for l, hidden in enumerate(self.hiddens):
            renames[f"fnns.{l}.0"] = (f"inputs.{l}", "input_first")
            renames.update({f"fnns.{l}.{k + 2}": (f"hiddens.{l}.{k}", None)
                            for k, m in enumerate(hidden) if isinstance(m, nn.Linear)})
        return renames

    def _token_linears(self) -> list[ConcatLinear]:
        return list(self.inputs)

    def _layers(self, context: Tensor, token_embed: Tensor, terms: list[Tensor]) -> list[Tensor]:
        outputs = []
        for term, inp, hidden, update in zip(terms, self.inputs, self.hiddens, self.updates):
            context = update(hidden(F.relu(inp(context, term))), context)
            outputs.append(context)
        return outputs


class SimpleContextBlock(ContextUpdater):
    """``simple`` updater: ``clamp(LN(tanh(W FNN([e; c]))), -10, 10)``.

    The FNN is ``input`` (``ReLU(W [c; e] + b)``) then ``hidden`` (``num_layers - 1``
    Linear+ReLU).
    """

    CLAMP = 10.0

    def __init__(self, cfg: ContextConfig, embed_dim: int):
        super().__init__()
        self.context_dim, self.embed_dim = cfg.context_dim, embed_dim
        H = cfg.hidden_dim
        self.input = ConcatLinear(cfg.context_dim, embed_dim, H)
        self.hidden = _fnn(H, H, cfg.num_layers - 1)
        self.out = nn.Linear(H, cfg.context_dim)
        self.norm = nn.LayerNorm(cfg.context_dim)
        self.layer_dims = [cfg.context_dim]
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _init_linear(module, cfg.init_std, cfg.bias_std)

    def legacy_renames(self) -> dict[str, tuple[str, str | None]]:
        """Checkpoints before ConcatLinear: ``fnn`` was one Sequential over ``[e; c]``."""
        renames: dict[str, tuple[str, str | None]] = {"fnn.0": ("input", "input_first")}
        renames.update({f"fnn.{k + 2}": (f"hidden.{k}", None)
                        for k, m in enumerate(self.hidden) if isinstance(m, nn.Linear)})
        return renames

    def _token_linears(self) -> list[ConcatLinear]:
        return [self.input]

    def _layers(self, context: Tensor, token_embed: Tensor, terms: list[Tensor]) -> list[Tensor]:
        h = self.hidden(F.relu(self.input(context, terms[0])))
        return [torch.clamp(self.norm(torch.tanh(self.out(h))), -self.CLAMP, self.CLAMP)]


def build_context_updater(cfg: ContextConfig | dict | None, embed_dim: int) -> ContextUpdater:
    """Build the updater named by ``cfg.updater`` for token embeddings of width ``embed_dim``."""
    cfg = ContextConfig.coerce(cfg)
    check_positive("embed_dim", embed_dim)
    cls = {"residual": ResidualContextBlock, "gated": GatedContextBlock, "simple": SimpleContextBlock}[cfg.updater]
    return cls(cfg, embed_dim)


def unroll(updater: ContextUpdater, token_embeds: Tensor, context0: Tensor | None = None,
           return_all_layers: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Sequential pass: ``c_t = f(c_{t-1}, e_t)`` for t = 0..T-1 from ``c_{-1} = context0``.

    The token's share of every Linear is computed for all T steps in one product
    (:meth:`ContextUpdater.token_terms`), so each step multiplies only the context.
    Differentiable (repetition training backpropagates through it).

    Args:
        token_embeds: ``(B, T, E)``.
        context0: ``(B, D)`` starting context; zeros when None.
    Returns:
        contexts ``(B, T, D)``, and with ``return_all_layers`` a list of ``(B, T, d_l)``.
    """
    B, T, _ = token_embeds.shape
    context = token_embeds.new_zeros(B, updater.context_dim) if context0 is None else context0
    if T == 0:
        out = token_embeds.new_zeros(B, 0, updater.context_dim)
        return (out, [token_embeds.new_zeros(B, 0, d) for d in updater.layer_dims]) if return_all_layers else out
    # per step: the token's embedding and its share of every layer, as views made in one call each
    steps = zip(token_embeds.unbind(1), *(term.unbind(1) for term in updater.token_terms(token_embeds)))
    finals: list[Tensor] = []
    per_layer: list[list[Tensor]] = [[] for _ in updater.layer_dims]
    for embed, *step_terms in steps:
        if return_all_layers:
            context, layers = updater.update_context_one_step(context, embed, True, step_terms)
            for store, layer in zip(per_layer, layers):
                store.append(layer)
        else:
            context = updater.update_context_one_step(context, embed, token_terms=step_terms)
        finals.append(context)
    contexts = torch.stack(finals, dim=1)
    if return_all_layers:
        return contexts, [torch.stack(store, dim=1) for store in per_layer]
    return contexts

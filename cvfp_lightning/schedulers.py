"""``--lr_scheduler`` on the model's own optimizer, and the check that a resume keeps its scheduler.

LightningCLI applies ``--lr_scheduler`` only together with ``--optimizer``, which replaces the
module's ``configure_optimizers``. The CVFP modules build their own optimizer (AdamW decaying
weight matrices only, the end-to-end module's own learning rate for the context block), so a
scheduler given alone would be ignored without a word and the run would train at a constant
rate. :func:`add_scheduler` puts the scheduler on the optimizer the module returns
(Lightning then steps it once per epoch, or once per ``val`` for ``ReduceLROnPlateau``;
Phase 1, which optimises by hand, steps it once per iteration).

A resumed fit loads the checkpoint's scheduler state over the new scheduler (``T_max``,
``gamma``, ... included) and starts a scheduler the checkpoint did not have from epoch 0:
:func:`check_resumed_schedulers` refuses both before anything is built.
"""

from __future__ import annotations

import inspect

import torch
from lightning.pytorch.cli import LightningCLI, instantiate_class

from cvfp_lightning.errors import CVFPUserError, check


def configure_with_scheduler(module, scheduler: dict):
    """``configure_optimizers`` of ``module``'s class (its one optimizer), with ``scheduler``
    (``{"class_path", "init_args"}``) on it, as LightningCLI returns them."""
    optimizer = type(module).configure_optimizers(module)
    check(isinstance(optimizer, torch.optim.Optimizer),
          f"--lr_scheduler: {type(module).__name__}.configure_optimizers returns {type(optimizer).__name__}, not "
          "one optimizer; give --optimizer too.")
    scheduler = instantiate_class(optimizer, scheduler)
    if not module.automatic_optimization:  # the module steps it (and reads a plateau's monitor) itself
        return [optimizer], [scheduler]
    return LightningCLI.configure_optimizers(module, optimizer, scheduler)


def add_scheduler(module, scheduler: dict) -> None:
    """Make ``module.configure_optimizers`` :func:`configure_with_scheduler` (a picklable partial,
    so a module that carries it still goes to ``ddp_spawn`` workers)."""
    from functools import partial, update_wrapper
    from types import MethodType

    fn = update_wrapper(partial(configure_with_scheduler, scheduler=scheduler), configure_with_scheduler)
    module.configure_optimizers = MethodType(fn, module)


def _settings(state: dict, scheduler_class: type) -> dict:
    """The constructor arguments a scheduler keeps in its ``state_dict`` (``T_max``, ``gamma``, ...)."""
    names = set()
    for cls in scheduler_class.__mro__:
        init = cls.__dict__.get("__init__")
        if init is not None:
            names |= set(inspect.signature(init).parameters)
    names = (names | {"min_lrs"}) - {"self", "optimizer", "last_epoch", "verbose"}  # min_lrs: min_lr per group
    # a per-group list compared as its values: the probe below has one group, the module may have more
    return {k: _group_values(v) if isinstance(v, list) else v for k, v in state.items() if k in names}


def _group_values(values: list):
    try:
        return sorted(set(values))
    except TypeError:  # unhashable or unorderable entries: as they are
        return values


def check_resumed_schedulers(ckpt_path: str, saved: list[dict], configured: dict | None) -> None:
    """Refuse a resume whose ``--lr_scheduler`` is not the checkpoint's (one line, the differences named).

    ``saved``: the checkpoint's ``lr_schedulers`` states; ``configured``: the run's
    ``lr_scheduler`` (``{"class_path", "init_args"}``) or None.
    """
    advice = "a resume must use the run's --lr_scheduler (its config.yaml holds it: --config <run>/config.yaml)."
    if not configured:
        if saved:
            raise CVFPUserError(f"--ckpt_path {ckpt_path!r} was trained with an --lr_scheduler and this run has none; "
                                + advice)
        return
    if not saved:
        raise CVFPUserError(f"--ckpt_path {ckpt_path!r} was trained without an --lr_scheduler and this run has "
                            f"{configured['class_path'].rsplit('.', 1)[-1]}; " + advice)
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        fresh = instantiate_class(probe, configured)
    except Exception as exc:  # the scheduler's own check of its arguments
        raise CVFPUserError(f"--lr_scheduler: {type(exc).__name__}: {exc}") from exc
    state = fresh.state_dict()
    old = saved[0]
    name = type(fresh).__name__
    if set(old) != set(state):
        raise CVFPUserError(f"--ckpt_path {ckpt_path!r} was trained with another --lr_scheduler than {name}; " + advice)
    want, had = _settings(state, type(fresh)), _settings(old, type(fresh))
    diffs = [f"{k}: checkpoint {had[k]!r} vs config {want[k]!r}" for k in sorted(want) if had.get(k) != want[k]]
    if diffs:
        raise CVFPUserError(f"--ckpt_path {ckpt_path!r} was trained with other --lr_scheduler settings; " + advice
                            + f" Differences: {'; '.join(diffs)}.")

"""User-facing errors (and the option-dataclass helper).

A ``CVFPUserError`` means the user gave a value we cannot work with. The ``cvfp`` CLI
prints its message as one line on stderr and exits with code 2 (no traceback unless
``--debug`` or ``CVFP_DEBUG=1``). Messages name the bad value, what was expected, and
how to fix it.
"""

from dataclasses import dataclass


class CVFPUserError(ValueError):
    """A bad value supplied by the user (config, data, checkpoint, cache, prompt)."""

    last: "CVFPUserError | None" = None  # the latest one raised (jsonargparse drops the cause)

    def __init__(self, *args):
        super().__init__(*args)
        CVFPUserError.last = self


def check(condition: bool, message: str) -> None:
    """Raise ``CVFPUserError(message)`` unless ``condition`` holds."""
    if not condition:
        raise CVFPUserError(message)


def check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise a clear error unless ``value`` is > 0 (or >= 0 with ``allow_zero``)."""
    ok = value >= 0 if allow_zero else value > 0
    bound = ">= 0" if allow_zero else "> 0"
    check(ok, f"{name}={value!r} is invalid: expected a number {bound}.")


def check_fraction(name: str, value: float, *, closed: bool = True) -> None:
    """Raise a clear error unless ``value`` lies in [0, 1] (or (0, 1) when not closed)."""
    ok = 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0
    interval = "[0, 1]" if closed else "(0, 1)"
    check(ok, f"{name}={value!r} is invalid: expected a value in {interval}.")


@dataclass
class ConfigMixin:
    """``coerce`` / ``to_dict`` for the option dataclasses (``context:``, ``embedding:``).

    A (field-less) dataclass itself, so jsonargparse still sees a pure dataclass and the
    YAML stays ``context: {context_dim: ...}`` rather than ``class_path``/``init_args``.

    ``coerce`` accepts an instance, a plain dict (as stored in checkpoints, unknown keys
    refused by name) or None (the defaults). Subclasses set ``_name`` for messages.
    """

    _name = "config"

    @classmethod
    def coerce(cls, value):
        from dataclasses import fields

        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise CVFPUserError(f"{cls._name} config has unknown keys {unknown}: expected some of {sorted(known)}.")
            return cls(**value)
        raise CVFPUserError(f"{cls._name} config {value!r} is invalid: expected a mapping.")

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

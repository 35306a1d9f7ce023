"""``cvfp``: the console entry point, a table from subcommand to entry function.

    cvfp fit --config configs/phase1.yaml                  # train (any Lightning subcommand)
    cvfp fit --config configs/phase1.yaml --ckpt_path last # resume the latest run
    cvfp scaling --config configs/scaling.yaml             # the scaling-law experiment
    cvfp --help                                            # every subcommand
    cvfp export --ckpt_path <run>/checkpoints/best.ckpt --out_dir exports/phase2
    cvfp evaluate exports/phase2 --text held_out.txt       # loss, ppl, acc, bpb of whole files
    cvfp generate exports/phase2 --prompt "The for statement"

Each entry is ``module:function`` taking the arguments after the subcommand (the Lightning
subcommands' entry takes the subcommand too: it is LightningCLI's own); modules are imported
only when their subcommand runs, and none of them imports this module (litgpt's
``__main__.py``). User errors (bad values, missing files, unreadable checkpoints, offline
hub misses) print one line ``cvfp: error: ...`` and exit with code 2; pass ``--debug`` (or
set ``CVFP_DEBUG=1``) for the traceback. The package's log lines (``cvfp: ...`` on stderr)
show from INFO up; ``--log_level WARNING`` (or ``CVFP_LOG_LEVEL``) quiets them. Both flags
may stand anywhere on the line and are taken out before the subcommand parses the rest.
"""

from __future__ import annotations

import importlib
import os
import sys

from cvfp_lightning.runtime import LOG_LEVELS, configure_logging, log_level, tune_cpu_allocator

LIGHTNING = "cvfp_lightning.runs:lightning_main"
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "fit": (LIGHTNING, "train a model (LightningCLI: --config, --ckpt_path, --trainer.*)"),
    "validate": (LIGHTNING, "score the validation split with a checkpoint (--ckpt_path)"),
    "test": (LIGHTNING, "score the test split with a checkpoint (--ckpt_path)"),
    "predict": (LIGHTNING, "generate continuations of prompts with a checkpoint (--ckpt_path)"),
    "scaling": ("cvfp_lightning.experiments.scaling_law:main",
                "the scaling law: Phase 1 + Phase 2 per data size, fit log(PPL) against log(tokens)"),
    "token-scaling": ("cvfp_lightning.experiments.token_count_scaling:main",
                      "Phase 1 token-wise convergence against the number of distinct tokens"),
    "export": ("cvfp_lightning.export:main", "write a checkpoint as a Hugging Face-style model folder"),
    "evaluate": ("cvfp_lightning.evaluate:main", "score whole text files with a model folder or checkpoint"),
    "generate": ("cvfp_lightning.generate:main", "continue prompts with a model folder or checkpoint"),
}


def usage() -> str:
    width = max(len(name) for name in SUBCOMMANDS)
    lines = ["usage: cvfp SUBCOMMAND [options]   (cvfp SUBCOMMAND --help for its options)", "", "subcommands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "--debug (or CVFP_DEBUG=1) shows the traceback of an error.",
              f"--log_level {'|'.join(LOG_LEVELS)} (or CVFP_LOG_LEVEL; default INFO): which of cvfp's log lines show."]
    return "\n".join(lines)


def entry(name: str):
    """The entry function of subcommand ``name``."""
    module, _, function = SUBCOMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), function)


def take_option(argv: list[str], name: str) -> str | None:
    """Remove ``--name VALUE`` / ``--name=VALUE`` from ``argv`` and from ``sys.argv`` (which
    LightningCLI reads); the last value in ``argv``, None when absent."""

    def take(args: list[str]) -> str | None:
        value, i = None, 0
        while i < len(args):
            if args[i] == name and i + 1 < len(args):
                value = args.pop(i + 1)
                args.pop(i)
            elif args[i].startswith(name + "="):
                value = args.pop(i).split("=", 1)[1]
            else:
                i += 1
        return value

    take(sys.argv)
    return take(argv)


def main(argv: list[str] | None = None) -> None:
    """Console entry point ``cvfp``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("CVFP_DEBUG", "") not in ("", "0")
    if "--debug" in argv:
        argv.remove("--debug")
        if "--debug" in sys.argv:
            sys.argv.remove("--debug")
        debug = True
    try:
        level = log_level(take_option(argv, "--log_level"))
    except ValueError as exc:
        print(f"cvfp: error: --log_level: {exc}", file=sys.stderr)
        sys.exit(2)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] not in SUBCOMMANDS:
        print(f"cvfp: error: unknown subcommand {argv[0]!r}: expected one of {', '.join(SUBCOMMANDS)} "
              "(cvfp --help).", file=sys.stderr)
        sys.exit(2)
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    tune_cpu_allocator()
    from cvfp_lightning.lightning_cli import CVFPArgumentParser, find_user_error

    configure_logging(level)  # after lightning's import, which sets its loggers' level
    CVFPArgumentParser.debug = debug
    try:
        if SUBCOMMANDS[argv[0]][0] == LIGHTNING:
            entry(argv[0])(argv)
        else:
            entry(argv[0])(argv[1:])
    except Exception as exc:  # noqa: BLE001 - only user errors are shortened, others re-raised
        user = find_user_error(exc)
        if user is None or debug:
            raise
        print(f"cvfp: error: {user}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

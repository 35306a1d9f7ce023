"""Helpers shared by the tests (``from helpers.cli import run_cli``); fixtures live in ``conftest.py``.

- ``helpers.cli``: the repository paths (``ROOT``, ``CONFIGS``), the in-process CLI runner and
  TensorBoard scalars read back;
- ``helpers.lm``: tiny Phase 1 checkpoints, trainers and data of the language-model tests;
- ``helpers.scaling``: ``cvfp scaling`` settings and a fake training runner.
"""

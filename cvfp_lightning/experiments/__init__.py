"""Experiments built on the training code: the scaling law (``cvfp scaling``), token-count scaling of Phase 1."""

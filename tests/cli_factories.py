"""Factories for `peftc inspect cli_factories:<name>` in the CLI tests (tests/ is on sys.path)."""

import torch
from families import FAMILIES


def tiny_llama():
    """A transformers model: peftc builds its example inputs."""
    return FAMILIES["llama"].build()


def tiny_mlp():
    """A plain torch model with its example inputs."""
    return FAMILIES["mlp"].build(), (torch.randn(3, 16),)


def not_a_model():
    return "not a model"

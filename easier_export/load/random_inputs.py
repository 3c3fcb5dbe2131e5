"""Seeded stand-ins for validation inputs, to verify an export when no DATA is given."""

from __future__ import annotations

import torch

from .models import LoadedModel
from .text import random_token_batches


def random_inputs(loaded: LoadedModel) -> list[torch.Tensor]:
    """Two seeded batches of four images at the model's input size (token ids: at two sequence lengths)."""
    if loaded.text is not None:
        return random_token_batches(loaded.text, loaded.input_size[0])
    return [torch.randn(4, *loaded.input_size, generator=torch.Generator().manual_seed(i)) for i in range(2)]

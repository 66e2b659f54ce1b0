"""glmc::embedding_int8: rows of an int8 embedding table with one fp32 scale per row."""

from __future__ import annotations

import torch

from glmc.registry import define


def _fake(ids, qweight, scales):
    return torch.empty((*ids.shape, qweight.shape[1]), dtype=torch.float32, device=ids.device)


@define("embedding_int8", fake=_fake, fp32_args=(2,))
def embedding_int8(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Rows of an int8 table (V, H) with one fp32 scale per row (V,)."""
    return qweight[ids].float() * scales[ids].unsqueeze(-1)

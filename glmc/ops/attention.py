"""glmc::attention: grouped-query attention over the KV cache, softmax in fp32."""

from __future__ import annotations

import torch

from glmc.registry import define


def _fake(q, k, v, mask, scale, past_k=None, past_v=None):
    return torch.empty_like(q)


@define("attention", fake=_fake)
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
              past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over [past_k; k], grouped-query, softmax in fp32.

    q (B, H, T, D); k, v (B, Hkv, T, D); past_k, past_v (B, Hkv, S, D) or None;
    mask (B, 1, T, S+T) additive. Returns (B, H, T, D). K/V heads are never
    repeated in memory: q is viewed as (B, Hkv, H/Hkv * T, D).
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if past_k is not None:
        k = torch.cat((past_k, k), dim=2)
        v = torch.cat((past_v, v), dim=2)
    # scores in fp32 from the start: an fp16 q.k can exceed 65504 before any softmax
    qg = q.reshape(B, Hkv, (H // Hkv) * T, D).float()
    scores = (qg @ k.float().transpose(-1, -2)) * scale               # (B, Hkv, rep*T, Tk)
    scores = scores.view(B, Hkv, H // Hkv, T, -1) + mask.float().unsqueeze(1)
    p = torch.softmax(scores, dim=-1).to(v.dtype).view(B, Hkv, (H // Hkv) * T, -1)
    return (p @ v).reshape(B, H, T, D)

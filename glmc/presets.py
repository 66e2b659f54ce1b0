"""Built-in, seeded, random-weight GLM models: nothing is downloaded.

`tiny-glm` is the default model of the README and most tests (a few million
parameters); `small-glm` (~150M parameters) is the benchmark model.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmc.errors import GlmcError


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    config: dict
    seed: int = 0


# Token ids 0..2 are the specials of the byte-level preset tokenizer (glmc/tokenizer.py).
_SPECIALS = dict(pad_token_id=0, eos_token_id=1, bos_token_id=2)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "tiny-glm",
            "2 layers, hidden 128, 4 heads / 2 KV heads, vocab 4096 (~1.4M params)",
            dict(
                model_type="glm", vocab_size=4096, hidden_size=128, intermediate_size=352,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                max_position_embeddings=1024, rms_norm_eps=1e-5, attention_bias=True,
                partial_rotary_factor=0.5, rope_theta=10000.0, **_SPECIALS,
            ),
        ),
        Preset(
            "small-glm",
            "8 layers, hidden 1024, 16 heads / 2 KV heads, head_dim 64, vocab 32000 (~154M params)",
            dict(
                model_type="glm", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=2, head_dim=64,
                max_position_embeddings=4096, rms_norm_eps=1e-5, attention_bias=True,
                partial_rotary_factor=0.5, rope_theta=10000.0, **_SPECIALS,
            ),
        ),
        Preset(
            "glm-1b",
            "16 layers, hidden 2048, 16 heads / 2 KV heads, head_dim 128, vocab 65024 (~1.0B params; GPU benchmarks)",
            dict(
                model_type="glm", vocab_size=65024, hidden_size=2048, intermediate_size=6144,
                num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=2, head_dim=128,
                max_position_embeddings=8192, rms_norm_eps=1e-5, attention_bias=True,
                partial_rotary_factor=0.5, rope_theta=10000.0, **_SPECIALS,
            ),
        ),
    ]
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise GlmcError(
            f"'{name}' is neither a checkpoint directory nor a preset "
            f"(presets: {', '.join(PRESETS)})"
        ) from None

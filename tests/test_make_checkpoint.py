"""tools/make_checkpoint.py: real-model shapes written as sharded safetensors, loadable by
glmc and transformers, reproducible per tensor, memory bounded by one shard."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import make_checkpoint as mk  # noqa: E402


def test_shapes_match_the_released_parameter_counts():
    """GLM-4-9B is ~9.4B parameters and ChatGLM3-6B ~6.2B (their model cards)."""
    counts = {s: sum(int(torch.Size(shape).numel()) for _, shape in mk.tensor_specs(mk.glm_config(s)))
              for s in ("glm4-9b", "chatglm3-6b", "glm-2b")}
    assert 9.3e9 < counts["glm4-9b"] < 9.5e9
    assert 6.1e9 < counts["chatglm3-6b"] < 6.3e9
    assert 1e9 < counts["glm-2b"] < 2e9


def test_sharded_checkpoint_loads_in_glmc(tmp_path):
    out = tmp_path / "ck"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "make_checkpoint.py"), "chatglm3-6b", str(out),
                        "--layers", "2", "--hidden", "128", "--shard-gb", "0.005"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert info["shards"] > 2 and len(set(index["weight_map"].values())) == info["shards"]
    from glmc import checkpoint

    loaded = checkpoint.load(out)
    assert loaded.config["num_hidden_layers"] == 2 and loaded.config["vocab_size"] == 65024
    assert sum(p.numel() for p in loaded.model.parameters()) == info["parameters"]
    norm = loaded.model.model.norm.weight
    assert abs(float(norm.mean()) - 1.0) < 0.01 and float(loaded.model.lm_head.weight.std()) < 0.03


def test_tensors_are_reproducible_by_name():
    a = mk.random_tensor("model.layers.3.mlp.down_proj.weight", (64, 32), torch.bfloat16, seed=7)
    b = mk.random_tensor("model.layers.3.mlp.down_proj.weight", (64, 32), torch.bfloat16, seed=7)
    c = mk.random_tensor("model.layers.4.mlp.down_proj.weight", (64, 32), torch.bfloat16, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_shard_plan_bounds_each_shard():
    specs = [(f"t{i}", (1000,)) for i in range(10)] + [("big", (5000,))]
    plan = mk.shard_plan(specs, itemsize=2, shard_bytes=4000)
    assert [len(s) for s in plan] == [2, 2, 2, 2, 2, 1]
    assert all(sum(2 * s[0] for _, s in shard) <= 4000 for shard in plan[:-1]) and plan[-1] == [("big", (5000,))]


def test_special_ids_stay_inside_a_smaller_vocabulary():
    cfg = mk.glm_config("glm4-9b", vocab=2048)        # released: pad 151329, eos [151329, 151336, 151338]
    assert cfg.pad_token_id == 2047 and cfg.eos_token_id == [2047]
    assert mk.glm_config("glm4-9b").eos_token_id == [151329, 151336, 151338]

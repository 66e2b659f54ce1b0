"""The CLI: commands work end to end; user mistakes are one line and a non-zero exit."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from glmc.cli import main


@pytest.fixture()
def cli():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def test_every_command_has_help(cli):
    for cmd in ["compile", "run", "inspect", "verify", "presets"]:
        r = cli(cmd, "--help")
        assert r.exit_code == 0 and "Usage:" in r.output


def test_presets_lists_both(cli):
    out = cli("presets").output
    assert "tiny-glm" in out and "small-glm" in out


def test_compile_run_verify_inspect(cli, tmp_path):
    art = tmp_path / "tiny.glmc"
    r = cli("compile", "tiny-glm", "-o", art, "--max-seq-len", "64")
    assert r.exit_code == 0, r.output
    assert "verified" in r.output
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["format_version"] == 4 and manifest["target"] == "cpu"
    assert {"weights.safetensors", "step.onnx", "report.json"} <= set(manifest["files"])
    assert "score.onnx" not in manifest["files"]          # the step graph scores too
    assert len(manifest["source"]["sha256"]) == 64

    r = cli("run", art, "--ids", "5,6,7", "--max-new-tokens", "8")
    assert r.exit_code == 0
    ids = r.output.splitlines()[0].removeprefix("ids: ").split()
    assert len(ids) == 8 and "tok/s" in r.output

    r = cli("run", art, "--prompt", "Hello", "--max-new-tokens", "4", "--temperature", "0.7", "--seed", "1")
    assert r.exit_code == 0 and "text: 'Hello" in r.output
    again = cli("run", art, "--prompt", "Hello", "--max-new-tokens", "4", "--temperature", "0.7", "--seed", "1")
    assert again.output.splitlines()[0] == r.output.splitlines()[0]

    r = cli("verify", art)
    assert r.exit_code == 0 and "OK" in r.output

    r = cli("inspect", art)
    assert "fold_noops" in r.output and "step.onnx" in r.output and "GroupQueryAttention" in r.output


def _inspect_counts(text: str) -> dict:
    """{(graph, pass): matches} from `glmc inspect MODEL` output."""
    counts, graph = {}, None
    for line in text.splitlines():
        m = re.match(r"== (\w+) graph", line)
        if m:
            graph = m.group(1)
        m = re.match(r"\s+(\w+)\s+matches=(\d+)", line)
        if m and graph:
            counts[(graph, m.group(1))] = int(m.group(2))
    return counts


@pytest.mark.parametrize("variant, target", [("tiny-glm", "cpu"), ("glm-gqa", "cuda:sm_80,sm_90")])
def test_inspect_model_counts_equal_the_compile_manifest(cli, checkpoints, artifacts, variant, target):
    """inspect builds the same pass context and entry points as compile, so every pass's
    match count agrees (a held-out checkpoint once showed fuse_rotary 0 in inspect, 12 in compile)."""
    r = cli("inspect", variant if variant == "tiny-glm" else checkpoints(variant), "--target", target)
    assert r.exit_code == 0, r.output
    assert "aten.linear x" in r.output
    shown = _inspect_counts(r.output)
    # the GPU target builds the extend entry by default (as inspect assumes); cpu does not
    art = artifacts(variant) if target == "cpu" else artifacts(variant, target=target, chunked_prefill=True)
    manifest = json.loads((art / "manifest.json").read_text())
    compiled = {(p["graph"], p["name"]): p["matches"] for p in manifest["passes"]}
    assert shown == compiled
    first = "extend" if target == "cpu" else "prefill"      # the entry a prompt runs through
    assert shown[(first, "fuse_rotary")] > 0 and shown[(first, "last_token_logits")] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["compile", "no-such-model"], "neither a checkpoint directory nor a preset"),
        (["compile", "./missing-dir"], "no such checkpoint directory"),
        (["compile", "tiny-glm", "--quant", "int3"], "unknown quant"),
        (["compile", "tiny-glm", "--dtype", "fp8"], "unknown dtype"),
        (["compile", "tiny-glm", "--target", "tpu"], "unknown target"),
        (["compile", "tiny-glm", "--max-seq-len", "100000"], "--max-seq-len must be in"),
        (["compile", "tiny-glm", "--target", "cuda", "--kv-cache", "fp16"], "--kv-cache fp16 is a cpu option"),
        (["compile", "tiny-glm", "--target", "cuda", "--quant", "int8", "--int8-matmul", "dynamic"],
         "--int8-matmul dynamic is a cpu option"),
        (["compile", "tiny-glm", "--int8-matmul", "dynamic"], "--int8-matmul dynamic needs int8 linears"),
        (["compile", "tiny-glm", "--quant", "int8", "--int8-matmul", "dynamic", "--kv-cache", "fp16"],
         "needs the lean step graph"),
        (["compile", "tiny-glm", "--dtype", "bf16", "--quant", "int8"],
         "--dtype bf16 on the cpu target stores unquantized linears in 16 bits"),
        (["compile", "tiny-glm", "--dtype", "fp16", "--kv-cache", "fp16"], "needs the lean step graph"),
        (["run", "missing.glmc", "--ids", "1"], "no such artifact directory"),
        (["verify", "missing.glmc"], "no such artifact directory"),
    ],
)
def test_user_errors_are_one_line(cli, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli(*args)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glmc: error:") and message in lines[0]
    assert not list(tmp_path.glob("*.glmc")) and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ids", "5,x"], "comma-separated integers"),
        (["--ids", "5", "--prompt", "a"], "exactly one of"),
        (["--ids", "999999"], "outside the vocabulary"),
        (["--ids", "5", "--temperature", "-1"], "temperature"),
        (["--ids", "5", "--top-p", "0"], "top_p"),
        (["--ids", "5", "--top-k", "-2"], "top_k"),
        (["--prompt", ""], "empty"),
        (["--ids", ",".join(["5"] * 92), "--max-new-tokens", "5"], "max length 96"),
    ],
)
def test_runtime_input_errors(cli, artifacts, args, message):
    art = artifacts("tiny-glm")
    r = cli("run", art, *args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.output


def test_prompt_exactly_at_max_length_works(artifacts):
    import glmc

    model = glmc.load(artifacts("tiny-glm"))
    cap = model.max_seq_len
    assert len(model.generate([[5] * (cap - 4)], max_new_tokens=4, stop_at_eos=False)[0]) == 4
    # and the runtime stays usable after a refused call
    with pytest.raises(Exception, match="max length"):
        model.generate([[5] * cap], max_new_tokens=1)
    assert len(model.generate([[5, 6]], max_new_tokens=2)[0]) == 2

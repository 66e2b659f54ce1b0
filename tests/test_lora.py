"""LoRA adapters merged at compile, against PEFT's own merge_and_unload.

Adapters are made with peft on tiny glm / glm4 / original-ChatGLM bases, with random A
and B (init_lora_weights=False) so the delta matters (logits move by ~3), and saved with
save_pretrained. Tolerances (fp32): logits within 1e-4 of PEFT's merged model (measured
~2e-6); greedy tokens identical. int4: verified at compile against the merged fp32 model
under the int4 gate, and closer to the merged model than to the base.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import glmc
from glmc.checkpoint import load
from glmc.cli import main
from glmc.errors import GlmcError
from glmc.lora import read_adapter
from tests.conftest import VARIANTS, make_hf_model

peft = pytest.importorskip("peft", reason="peft is a test dependency (pip install -e '.[test]')")

ATOL = 1e-4
IDS = [5, 9, 200, 7, 100, 3, 44, 45]
GLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
CHATGLM_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]


def _adapter(model, path, targets, seed=1, **config):
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(**dict(dict(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False), **config))
    peft.get_peft_model(model, cfg).save_pretrained(path)
    return path


def _merged(model, *adapters):
    """PEFT's merge_and_unload of each (path, scale), one after the other."""
    for path, scale in adapters:
        pm = peft.PeftModel.from_pretrained(model, path)
        for m in pm.modules():
            if isinstance(m, peft.tuners.lora.LoraLayer):
                m.set_scale("default", scale)
        model = pm.merge_and_unload()
    return model


def _logits(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=False)
    return out.logits[0]


def _greedy(model, ids, n):
    seq = list(ids)
    for _ in range(n):
        seq.append(int(_logits(model, seq)[-1].argmax()))
    return seq[len(ids):]


def test_merged_artifact_matches_peft(tmp_path):
    base = make_hf_model(VARIANTS["glm-gqa"])
    base.save_pretrained(tmp_path / "base")
    ad = _adapter(make_hf_model(VARIANTS["glm-gqa"]), tmp_path / "lora", GLM_TARGETS)
    merged = _merged(make_hf_model(VARIANTS["glm-gqa"]), (ad, 1.0))
    assert float((_logits(merged) - _logits(base)).abs().max()) > 0.5          # the adapter matters
    art = glmc.compile(tmp_path / "base", tmp_path / "a.glmc", progress=False, max_seq_len=64, verify=False,
                       lora=[ad])
    rt = glmc.load(art)
    assert float(np.abs(rt.logits(IDS) - _logits(merged).numpy()).max()) <= ATOL
    assert rt.generate([IDS[:3], IDS], max_new_tokens=8) == [_greedy(merged, IDS[:3], 8), _greedy(merged, IDS, 8)]
    (record,) = rt.manifest["source"]["adapters"]
    assert record["scale"] == 1.0 and len(record["sha256"]) == 64 and record["r"] == 8
    # `glmc verify` re-applies the recorded adapter (checking its sha256) to the reference
    code, lines = _cli("verify", art)
    assert code == 0 and lines[-1].endswith("OK"), lines


def test_two_adapters_with_scales_on_glm4(tmp_path):
    spec = VARIANTS["glm4-mqa"]
    make_hf_model(spec).save_pretrained(tmp_path / "base")
    a = _adapter(make_hf_model(spec), tmp_path / "a", ["q_proj", "v_proj", "down_proj"], seed=1)
    b = _adapter(make_hf_model(spec), tmp_path / "b", ["o_proj", "gate_up_proj"], seed=2, r=4, lora_alpha=8,
                 use_rslora=True)
    want = _logits(_merged(make_hf_model(spec), (a, 0.5), (b, 1.0)))
    got = _logits(load(tmp_path / "base", adapters=[read_adapter(a, 0.5), read_adapter(b)]).model)
    assert float((want - got).abs().max()) <= ATOL


def test_chatglm_layout_adapter_maps_like_the_base_weights(tmp_path):
    """An adapter trained on the original ChatGLM modules (query_key_value split into q/k/v by
    glmc): merged mapping vs PEFT on the original code; int4 compile verified against it."""
    from tests.chatglm_reference import original_model, require_reference, save_release

    folder = require_reference() / "chatglm3-6b"
    base_dir = save_release(original_model(folder), folder, tmp_path / "base")
    ad = _adapter(original_model(folder), tmp_path / "lora", CHATGLM_TARGETS)
    keys = json.loads((ad / "adapter_config.json").read_text())["target_modules"]
    assert set(keys) == set(CHATGLM_TARGETS)
    merged = _merged(original_model(folder), (ad, 1.0))
    want = _logits(merged)
    got = _logits(load(base_dir, adapters=[read_adapter(ad)]).model)
    assert float((want - got).abs().max()) <= ATOL
    # int4: verified at compile against the merged fp32 model (raises if outside the gate)
    art = glmc.compile(base_dir, tmp_path / "q.glmc", progress=False, max_seq_len=64, quant="int4", group_size=32,
                       lora=[(ad, 1.0)])
    q = glmc.load(art).logits(IDS)
    base = _logits(original_model(folder)).numpy()
    assert np.abs(q - want.numpy()).mean() < np.abs(q - base).mean()


def _cli(*args):
    from click.testing import CliRunner

    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output.strip().splitlines()


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    make_hf_model(VARIANTS["glm-gqa"]).save_pretrained(root / "base")
    _adapter(make_hf_model(VARIANTS["glm-gqa"]), root / "lora", GLM_TARGETS)
    return root


def _edited_adapter(src, dst, **changes):
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("case,changes,message", [
    ("dora", dict(use_dora=True), "use_dora=true (DoRA) is not supported"),
    ("prefix", dict(peft_type="PREFIX_TUNING"), "peft_type PREFIX_TUNING is not supported"),
    ("bias", dict(bias="all"), "bias='all'"),
    ("unknown-target", dict(target_modules=["q_proj", "c_attn"]), "target module 'c_attn' is not a module of the base"),
    ("alora", dict(alora_invocation_tokens=[5, 6]), "alora_invocation_tokens=[5, 6] is not supported"),
])
def test_unsupported_adapters_are_refused_in_one_line(base_and_adapter, tmp_path, case, changes, message):
    ad = _edited_adapter(base_and_adapter / "lora", tmp_path / case, **changes)
    code, lines = _cli("compile", base_and_adapter / "base", "-o", tmp_path / "x.glmc", "--lora", ad)
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not (tmp_path / "x.glmc").exists()


def test_adapter_for_another_base_is_refused_naming_the_module(base_and_adapter, tmp_path):
    _adapter(make_hf_model(VARIANTS["glm-mha-tied"]), tmp_path / "other", ["q_proj"])
    code, lines = _cli("compile", base_and_adapter / "base", "-o", tmp_path / "x.glmc", "--lora", tmp_path / "other")
    assert code == 2 and len(lines) == 1, lines
    assert "module model.layers.0.self_attn.q_proj is (128, 64) in the base" in lines[0], lines


def test_adapter_directory_as_model_names_the_lora_command(base_and_adapter, tmp_path):
    code, lines = _cli("compile", base_and_adapter / "lora", "-o", tmp_path / "x.glmc")
    assert code == 2 and len(lines) == 1, lines
    assert "is a PEFT LoRA adapter" in lines[0] and f"--lora {base_and_adapter / 'lora'}" in lines[0], lines


def test_base_directory_holding_an_adapter_warns_unless_merged(base_and_adapter, tmp_path):
    import shutil

    both = tmp_path / "both"
    shutil.copytree(base_and_adapter / "base", both)
    for f in (base_and_adapter / "lora").iterdir():
        shutil.copy(f, both / f.name)
    with pytest.warns(UserWarning, match="also holds a LoRA adapter .* pass --lora"):
        load(both)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(both, adapters=[read_adapter(both)])


def test_lora_scale_count_must_match(base_and_adapter, tmp_path):
    ad = base_and_adapter / "lora"
    code, lines = _cli("compile", base_and_adapter / "base", "-o", tmp_path / "x.glmc", "--lora", ad, "--lora", ad,
                       "--lora-scale", "0.5", "--lora-scale", "1", "--lora-scale", "2")
    assert code == 2 and "--lora-scale given 3 times for 2 --lora adapters" in lines[0], lines


# ------------------------------------------------------------------ run-time adapter slots

@pytest.fixture(scope="module")
def slotted(tmp_path_factory):
    """A glm-gqa base with two adapters (b: another rank, targets and scale), compiled once with
    two adapter slots (verified at compile: the no-adapter path against transformers) and
    once with each adapter merged."""
    root = tmp_path_factory.mktemp("slots")
    spec = VARIANTS["glm-gqa"]
    make_hf_model(spec).save_pretrained(root / "base")
    a = _adapter(make_hf_model(spec), root / "a", GLM_TARGETS, seed=1)
    b = _adapter(make_hf_model(spec), root / "b", ["q_proj", "o_proj", "down_proj"], seed=2, r=4)
    art = glmc.compile(root / "base", root / "slots.glmc", progress=False, max_seq_len=64, lora_slots=2, lora_rank=8)
    merged = {name: glmc.compile(root / "base", root / f"{name}.glmc", progress=False, max_seq_len=64, verify=False,
                                 lora=[(path, scale)])
              for name, path, scale in (("a", a, 1.0), ("b", b, 0.5))}
    return root, art, merged


def test_runtime_adapters_equal_their_merged_artifacts_row_by_row(slotted):
    root, art, merged = slotted
    rt = glmc.load(art)
    assert rt.manifest["backend"]["lora"]["slots"] == 2
    rt.add_adapter("a", root / "a")
    rt.add_adapter("b", root / "b", scale=0.5)
    ma, mb = glmc.load(merged["a"]), glmc.load(merged["b"])
    prompts = [IDS, IDS[:3], IDS[:5], IDS]
    # one batch, each row its own adapter (or none): each row's greedy tokens are its merged artifact's
    got = rt.generate(prompts, max_new_tokens=8, adapter=["a", "b", None, "b"])
    base = glmc.load(art).generate(prompts, max_new_tokens=8)
    assert got == [ma.generate(IDS, max_new_tokens=8)[0], mb.generate(IDS[:3], max_new_tokens=8)[0], base[2],
                   mb.generate(IDS, max_new_tokens=8)[0]]
    assert got[0] != base[0] and got[3] != base[3]              # the adapters change the tokens
    # logits (fp32): unmerged x @ A @ B against the merged weights, within the fp32 tolerance
    for name, m in (("a", ma), ("b", mb)):
        _, last = rt.prefill([IDS], rt._adapter_slots(name, 1))
        assert float(np.abs(last[0] - m.logits(IDS)[-1]).max()) <= ATOL
    # streaming and one name for the whole batch take the same path
    assert [t.id for t in rt.stream(IDS[:3], max_new_tokens=8, adapter="b")] == got[1]
    assert rt.generate([IDS, IDS], max_new_tokens=4, adapter="a") == [got[0][:4]] * 2
    # a slot is freed and reused: b removed, a loaded again under another name
    rt.remove_adapter("b")
    rt.add_adapter("a2", root / "a")
    assert rt.generate(IDS, max_new_tokens=8, adapter="a2") == [got[0]]


def test_runtime_adapter_errors_are_one_line(slotted, tmp_path):
    root, art, merged = slotted
    rt = glmc.load(art)
    with pytest.raises(GlmcError, match="no adapter named 'a' is loaded"):
        rt.generate(IDS, max_new_tokens=2, adapter="a")
    rt.add_adapter("a", root / "a")
    with pytest.raises(GlmcError, match="'a' is already loaded"):
        rt.add_adapter("a", root / "a")
    rt.add_adapter("b", root / "b")
    with pytest.raises(GlmcError, match="all 2 adapter slots are in use"):
        rt.add_adapter("c", root / "a")
    with pytest.raises(GlmcError, match="one name .or None. per prompt"):
        rt.generate([IDS, IDS], max_new_tokens=2, adapter=["a"])
    # rank above --lora-rank, another base, the lm_head, modules_to_save: refused, nothing loaded
    spec = VARIANTS["glm-gqa"]
    cases = [
        (_adapter(make_hf_model(spec), tmp_path / "r16", ["q_proj"], r=16), "has rank 16, above the artifact's --lora-rank 8"),
        (_adapter(make_hf_model(VARIANTS["glm-mha-tied"]), tmp_path / "other", ["q_proj"]), "(128, 64) in the base"),
        (_adapter(make_hf_model(spec), tmp_path / "head", ["lm_head"]), "lm_head is not a decoder linear"),
        (_adapter(make_hf_model(spec), tmp_path / "save", ["q_proj"], modules_to_save=["lm_head"]), "modules_to_save"),
    ]
    rt.remove_adapter("b")
    for path, message in cases:
        with pytest.raises(GlmcError, match=message.replace("(", r"\(").replace(")", r"\)")):
            rt.add_adapter("x", path)
        assert "x" not in rt.adapters
    # an artifact built without slots says how to get them
    with pytest.raises(GlmcError, match="no run-time adapter slots .compile it with --lora-slots"):
        glmc.load(merged["a"]).add_adapter("a", root / "a")


def test_lora_slots_options_are_checked_up_front(slotted, tmp_path):
    root = slotted[0]
    for args, message in [
        (["--lora-slots", "2", "--target", "cuda:sm_90"], "--lora-slots is built for the cpu target only"),
        (["--lora-slots", "2", "--quant", "int4", "--calibrate", "2"], "cannot be combined with --calibrate"),
        (["--lora-slots", "2", "--kv-cache", "fp16"], "--kv-cache fp16"),
        (["--lora-slots", "1", "--lora-rank", "0"], "--lora-rank must be a positive integer"),
    ]:
        code, lines = _cli("compile", root / "base", "-o", tmp_path / "x.glmc", *args)
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, lines)
        assert not (tmp_path / "x.glmc").exists()


def test_int4_slots_leave_the_base_path_as_built_without_them(tmp_path):
    """int4 + slots: with no adapter the tokens and logits are those of the int4 artifact built
    without slots (the W = 0 tables add nothing); with one, the logits move toward PEFT's merge."""
    spec = VARIANTS["glm4-mqa"]
    make_hf_model(spec).save_pretrained(tmp_path / "base")
    ad = _adapter(make_hf_model(spec), tmp_path / "a", GLM_TARGETS)
    common = dict(progress=False, max_seq_len=64, quant="int4", group_size=32)
    # MatMulNBits, which --lora-slots builds run
    plain = glmc.load(glmc.compile(tmp_path / "base", tmp_path / "p.glmc", verify=False, int4_matmul="nbits",
                                   int8_matmul="nbits", **common))
    rt = glmc.load(glmc.compile(tmp_path / "base", tmp_path / "s.glmc", lora_slots=1, lora_rank=8, **common))
    assert rt.generate([IDS, IDS[:4]], max_new_tokens=8) == plain.generate([IDS, IDS[:4]], max_new_tokens=8)
    _, none = rt.prefill([IDS])
    _, want = plain.prefill([IDS])
    assert np.array_equal(none, want)
    rt.add_adapter("a", ad)
    _, got = rt.prefill([IDS], rt._adapter_slots("a", 1))
    merged = _logits(_merged(make_hf_model(spec), (ad, 1.0)))[-1].numpy()
    base = _logits(make_hf_model(spec))[-1].numpy()
    assert np.abs(got[0] - merged).mean() < 0.5 * np.abs(got[0] - base).mean()


def test_runtime_adapter_on_the_original_chatglm_layout(tmp_path):
    """An adapter on ChatGLM's per-head packed query_key_value (multi_query_attention false),
    laid into the slots at run time, gives PEFT-merged tokens of the original code."""
    from tests.chatglm_reference import greedy, original_model, require_reference, save_release

    folder = require_reference() / "chatglm3-6b"
    variant = dict(multi_query_attention=False, kv_channels=32)     # rotary 16 wide: the step graph
    base_dir = save_release(original_model(folder, **variant), folder, tmp_path / "base")
    ad = _adapter(original_model(folder, **variant), tmp_path / "lora", CHATGLM_TARGETS)
    merged = _merged(original_model(folder, **variant), (ad, 1.0))
    rt = glmc.load(glmc.compile(base_dir, tmp_path / "s.glmc", progress=False, max_seq_len=64, verify=False,
                                lora_slots=1, lora_rank=8))
    rt.add_adapter("chat", ad)
    _, last = rt.prefill([IDS], rt._adapter_slots("chat", 1))
    assert float(np.abs(last[0] - _logits(merged)[-1].numpy()).max()) <= ATOL
    assert rt.generate([IDS, IDS[:4]], max_new_tokens=8, adapter="chat") == [greedy(merged, IDS, 8),
                                                                             greedy(merged, IDS[:4], 8)]


def test_adapter_on_the_lm_head(tmp_path):
    """PEFT saves a LoRA'd lm_head's base weight beside it (save_embedding_layers): merged as
    PEFT merges it. A base whose lm_head is tied to the embedding is refused by name."""
    spec = VARIANTS["glm-gqa"]
    make_hf_model(spec).save_pretrained(tmp_path / "base")
    ad = _adapter(make_hf_model(spec), tmp_path / "a", ["q_proj", "lm_head"])
    want = _logits(_merged(make_hf_model(spec), (ad, 1.0)))
    assert float((want - _logits(load(tmp_path / "base", adapters=[read_adapter(ad)]).model)).abs().max()) <= ATOL
    tied = VARIANTS["glm-mha-tied"]
    make_hf_model(tied).save_pretrained(tmp_path / "tied")
    ad = _adapter(make_hf_model(tied), tmp_path / "t", ["q_proj", "lm_head"])
    with pytest.raises(GlmcError, match="ties lm_head to the embedding table"):
        load(tmp_path / "tied", adapters=[read_adapter(ad)])


def test_glmc_run_takes_an_adapter(slotted):
    root, art, merged = slotted
    code, lines = _cli("run", art, "--ids", "5,9,200", "--max-new-tokens", "6", "--adapter", root / "a")
    assert code == 0, lines
    want = glmc.load(merged["a"]).generate([5, 9, 200], max_new_tokens=6)[0]
    assert lines[0] == "ids: " + " ".join(map(str, want))
    code, lines = _cli("run", merged["a"], "--ids", "5,9", "--adapter", root / "a")
    assert code == 2 and len(lines) == 1 and "no run-time adapter slots" in lines[0], lines
    code, lines = _cli("inspect", art)
    assert code == 0 and any("run-time adapters: 2 slots of rank <= 8 on 8 decoder linears" in x for x in lines), lines

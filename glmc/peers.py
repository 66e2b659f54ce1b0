"""Other engines on the same weights, timed by `glmc bench --peers` beside glmc.

ONNX Runtime GenAI (`pip install glmc[peers]`, i.e. onnxruntime-genai): its model builder
converts the artifact's source checkpoint, written out as a Hugging Face directory, at the
artifact's precision (fp32; int4 with the artifact's group size and accuracy level 4, which
also makes the builder's lm_head int4). The builder has no GlmForCausalLM entry, but a GLM
checkpoint builds as ChatGLMModel: the same packed-QKV-with-bias attention (an all-zero bias,
as transformers initialises the presets', is left out of its graph) and interleaved partial
rotary. Generation goes through its own API (append_tokens, generate_next_token), as its
users run it.

Before timing, a peer's last-token logits after a prompt are compared with transformers':
within 1e-3 (fp32) or within verify.RELATIVE_RMS (quantized), the gate glmc's own artifacts pass.

llama.cpp (`pip install glmc[peers]`, i.e. llama-cpp-python, and gguf): glmc writes the
reference model's weights as GGUF itself (glmc/gguf_export.py: no tokenizer, token ids in
and out) at the precision that matches the artifact: F32 for fp32, Q8_0 for int8, Q4_0
(blocks of 32, every 2-D tensor) for int4. It runs through llama-cpp-python's Llama:
eval() of the prompt, then one eval() per generated token, the last token's logits read
in place; the same Python-driven loop glmc's own provider runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from glmc.benchmark import Provider
from glmc.errors import GlmcError

_ARCH = {"glm": "ChatGLMModel", "chatglm": "ChatGLMModel"}
FP16_CACHE_REL_RMS = 1e-2       # llama.cpp F32 weights with its default F16 KV cache (measured ~5e-4)


def available() -> dict[str, str | None]:
    """peer name -> None when it can run here, else why not."""
    out = {}
    for name, modules, package in (("ort-genai", ("onnxruntime_genai",), "onnxruntime-genai"),
                                   ("llama.cpp", ("llama_cpp", "gguf"), "llama-cpp-python and gguf")):
        try:
            for m in modules:
                __import__(m)
            out[name] = None
        except ImportError:
            out[name] = f"{package} is not installed (pip install glmc[peers])"
    return out


def write_hf_checkpoint(model, tokenizer_json: str | None, out: Path) -> Path:
    """The reference model as a Hugging Face directory the builder can read, its architecture
    named as the builder knows it."""
    model.save_pretrained(out)
    if tokenizer_json:
        (out / "tokenizer.json").write_text(tokenizer_json)
    _name_architecture(out / "config.json")
    return out


def builder_view(checkpoint: Path, out: Path) -> Path:
    """A checkpoint on disk as the builder reads it, without copying its weights: links to
    every file but config.json, which is written again naming the builder's architecture,
    and a stand-in tokenizer where the checkpoint has none."""
    out.mkdir(parents=True, exist_ok=True)
    for f in checkpoint.iterdir():
        if f.name != "config.json" and not (out / f.name).exists():
            (out / f.name).symlink_to(f.resolve())
    (out / "config.json").write_text((checkpoint / "config.json").read_text())
    _name_architecture(out / "config.json")
    if not (out / "tokenizer.json").exists():
        _stand_in_tokenizer(out)
    return out


def _stand_in_tokenizer(out: Path) -> None:
    """A word-level tokenizer for a checkpoint that has none (random-weight checkpoints of
    tools/make_checkpoint.py): the builder saves a tokenizer beside the model and fails
    without one. Benchmarks feed token ids, so it is never used to encode text."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    Tokenizer(WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>")).save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "eos_token": "<eos>"}))


def _name_architecture(cfg_path: Path) -> None:
    cfg = json.loads(cfg_path.read_text())
    arch = _ARCH.get(cfg.get("model_type"))
    if arch is None:
        raise GlmcError(f"ort-genai: no builder entry for model_type {cfg.get('model_type')!r}")
    cfg["architectures"] = [arch]
    cfg_path.write_text(json.dumps(cfg, indent=2))


def build_ort_genai(hf_dir: Path, out: Path, precision: str, group_size: int | None, threads: int) -> Path:
    """Run ONNX Runtime GenAI's builder on hf_dir (fp32, fp16, or int4 with group_size and
    accuracy level 4) into out, and set the thread count glmc runs with."""
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out / "cache")]
    if precision == "int4":
        cmd += ["--extra_options", "accuracy_level=4", f"block_size={group_size}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ort-genai builder failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
    if precision == "int4":
        import onnx

        graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        blocks = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
        if blocks != {group_size}:
            raise RuntimeError(f"ort-genai built block sizes {sorted(blocks)}, not the artifact's {group_size}")
    config = json.loads((out / "genai_config.json").read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    options["intra_op_num_threads"] = threads          # the thread count glmc runs with
    (out / "genai_config.json").write_text(json.dumps(config, indent=2))
    return out


class OrtGenaiProvider(Provider):
    """ONNX Runtime GenAI on a model its builder made (see the module docstring)."""

    name = "ort-genai"

    def __init__(self, hf_dir: Path, out: Path, quant: str, group_size: int | None, threads: int,
                 dtype: str = "fp32"):
        import onnxruntime_genai as og

        precision = {("none", "fp32"): "fp32", ("none", "fp16"): "fp16", ("int4", "fp32"): "int4"}.get((quant, dtype))
        if precision is None:
            raise GlmcError(f"ort-genai: no {quant if quant != 'none' else dtype} build to compare with "
                            f"(its builder makes fp32, fp16, int4)")
        build_ort_genai(hf_dir, out, precision, group_size, threads)
        self.og, self.path = og, out
        self.version = getattr(og, "__version__", "?")
        self.model = og.Model(str(out))
        self.precision = precision

    def weight_bytes(self, embedding_bytes: int) -> int:
        """What a decode step reads of the weights: the model's data files less its embedding table."""
        data = sum(p.stat().st_size for p in self.path.glob("*.onnx*"))
        return max(1, data - embedding_bytes)

    def _generator(self, ids, room: int):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(ids) + room + 2, do_sample=False)
        g = self.og.Generator(self.model, params)
        g.append_tokens(list(ids))
        return g

    def last_logits(self, ids) -> np.ndarray:
        g = self._generator(ids, 1)
        return np.asarray(g.get_output("logits"))[0, -1]

    def prefill(self, ids) -> None:
        self._generator(ids, 1)

    def start(self, ids, room: int = 64) -> dict:
        g = self._generator(ids, room)
        g.generate_next_token()             # picks from the prompt's logits
        return {"g": g, "tok": int(g.get_next_tokens()[0])}

    def steps(self, state: dict, n: int) -> list[int]:
        g, toks = state["g"], []
        for _ in range(n):
            g.generate_next_token()         # one run of the model on the last token, then a pick
            toks.append(int(g.get_next_tokens()[0]))
        state["tok"] = toks[-1] if toks else state["tok"]
        return toks


class LlamaCppProvider(Provider):
    """llama.cpp through llama-cpp-python on a GGUF glmc wrote (see the module docstring)."""

    name = "llama.cpp"

    def __init__(self, model, config: dict, out: Path, quant: str, threads: int, n_ctx: int, kv_f32: bool = False,
                 dtype: str = "fp32"):
        """kv_f32: an F32 KV cache instead of llama.cpp's default F16 (its users' setting, timed).
        With F32 its logits equal transformers' to ~2e-6 on a tiny model; with F16 to ~5e-4
        relative RMS, so the fp32 gate for the default is on relative RMS (FP16_CACHE_REL_RMS)."""
        import llama_cpp

        from glmc.gguf_export import quant_for, write_gguf

        if quant not in ("none", "int8", "int4"):
            raise GlmcError(f"llama.cpp: no build to compare with --quant {quant}")
        self.precision = quant_for(quant, dtype)
        out.mkdir(parents=True, exist_ok=True)
        self.path = write_gguf(model.state_dict(), config, out / f"model-{self.precision}.gguf", self.precision)
        cache = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32) if kv_f32 else {}
        self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_threads=threads,
                                   n_threads_batch=threads, verbose=False, **cache)
        self.fp32_rel_rms = None if kv_f32 else FP16_CACHE_REL_RMS
        self.version = getattr(llama_cpp, "__version__", "?")
        self.vocab = self.llm.n_vocab()

    def weight_bytes(self, embedding_bytes: int) -> int:
        """What a decode step reads of the weights: the file less its embedding table (at its type)."""
        import gguf

        reader = gguf.GGUFReader(str(self.path))
        emb = next(int(t.n_bytes) for t in reader.tensors if t.name == "token_embd.weight")
        return max(1, self.path.stat().st_size - emb)

    def _last(self) -> np.ndarray:
        """The last evaluated token's logits, read in place (valid until the next eval)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.vocab,))

    def last_logits(self, ids) -> np.ndarray:
        self.prefill(ids)
        return self._last().copy()

    def prefill(self, ids) -> None:
        self.llm.reset()
        self.llm.eval(list(ids))

    def start(self, ids) -> dict:
        self.prefill(ids)
        return {"tok": int(self._last().argmax())}

    def steps(self, state: dict, n: int) -> list[int]:
        toks = []
        for _ in range(n):
            self.llm.eval([state["tok"]])
            state["tok"] = int(self._last().argmax())
            toks.append(state["tok"])
        return toks


def check_logits(provider, model, ids, quant: str, dtype: str = "fp32") -> dict:
    """The peer's last-token logits vs transformers' on the same prompt; raises when off. 16-bit
    weights (dtype bf16 / fp16): the bound glmc's own artifacts of that dtype are verified at."""
    import torch

    from glmc.verify import RELATIVE_RMS, TOLERANCES, _rel_rms

    with torch.no_grad():
        ref = model(torch.tensor([list(ids)])).logits[0, -1].float().numpy()
    got = provider.last_logits(ids)
    diff = float(np.abs(got - ref).max())
    rel = _rel_rms(got, ref)        # the measure glmc's own quantized artifacts are gated on
    if quant == "none" and dtype != "fp32":
        atol, rtol = TOLERANCES[(dtype, "none")]
        bound = atol + rtol * float(np.abs(ref).max())
        ok = diff <= bound
    elif quant == "none" and getattr(provider, "fp32_rel_rms", None):      # fp32 weights, an fp16 KV cache
        bound = provider.fp32_rel_rms
        ok = rel <= bound
    elif quant == "none":
        ok, bound = diff <= 1e-3, 1e-3
    else:
        bound = RELATIVE_RMS[("fp32", quant)]
        ok = rel <= bound
    if not ok:
        raise RuntimeError(f"{provider.name} logits disagree with transformers: max abs {diff:.3g}, "
                           f"relative RMS {rel:.3g} (bound {bound})")
    return {"max_abs_diff": diff, "relative_rms": rel, "bound": bound}

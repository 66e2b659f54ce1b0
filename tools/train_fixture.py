"""Train the small GLM that quantization quality is measured on.

Random weights say nothing about quantization error, so glmc ships a model
that has learned something: a ~2.4M-parameter `glm` trained for a few minutes
on CPU on Python's own standard-library sources (present wherever Python is),
with a byte-level BPE tokenizer trained by the `tokenizers` library.

    python tools/train_fixture.py --out tests/fixtures/glm-pystdlib

Deterministic for a given Python stdlib, torch and tokenizers version (seeded,
deterministic algorithms, fixed thread count). Writes config.json,
model.safetensors (fp16), tokenizer.json, heldout.txt and calibration.txt
(held-out files never seen in training) and train_log.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path

import torch

CONFIG = dict(
    model_type="glm", vocab_size=2048, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=6, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
    rms_norm_eps=1e-5, attention_bias=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"},
)


def corpus(max_bytes: int):
    """Top-level stdlib modules, sorted; every 10th file (by name hash) is held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    size = 0
    for p in sorted(root.glob("*.py")):
        text = p.read_text(encoding="utf-8", errors="replace")
        bucket = int(hashlib.sha256(p.name.encode()).hexdigest(), 16) % 10
        (held if bucket == 0 else train).append(text)
        size += len(text)
        if size > max_bytes:
            break
    return train, held


def train_tokenizer(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("tests/fixtures/glm-pystdlib"))
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--corpus-bytes", type=int, default=6_000_000)
    args = ap.parse_args()

    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(0)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    train_texts, held_texts = corpus(args.corpus_bytes)
    tok = train_tokenizer(train_texts, CONFIG["vocab_size"])
    ids = torch.tensor([t for text in train_texts for t in tok.encode(text).ids + [1]], dtype=torch.long)
    print(f"train tokens {len(ids)}; held-out files {len(held_texts)}")

    config = transformers.GlmConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"})
    model = transformers.GlmForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    log = []
    t0 = time.time()
    for step in range(args.steps):
        lr = 3e-3 * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - args.seq - 1, (args.batch,), generator=gen)
        batch = torch.stack([ids[s: s + args.seq + 1] for s in starts.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - t0, 1)})
            print(log[-1])

    args.out.mkdir(parents=True, exist_ok=True)
    cfg = config.to_dict()
    cfg["model_type"] = "glm"
    cfg["architectures"] = ["GlmForCausalLM"]
    (args.out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
              str(args.out / "model.safetensors"))
    tok.save(str(args.out / "tokenizer.json"))
    held = "\n".join(held_texts)
    half = len(held) // 2
    (args.out / "heldout.txt").write_text(held[:half][:120_000])
    (args.out / "calibration.txt").write_text(held[half:][:60_000])
    (args.out / "train_log.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "torch": torch.__version__, "log": log}, indent=2) + "\n")


if __name__ == "__main__":
    main()

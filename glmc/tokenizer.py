"""Tokenizers and chat formats, without the checkpoint's remote code.

A checkpoint's text side comes in one of three forms, each read with the library made
for it:
- `tokenizer.json` (transformers-format repos, presets): `tokenizers`;
- ChatGLM2/ChatGLM3 `tokenizer.model`, a sentencepiece model; special tokens follow the
  sentencepiece vocabulary: [MASK] [gMASK] [sMASK] sop eop, and for ChatGLM3 also
  <|system|> <|user|> <|assistant|> <|observation|>;
- GLM-4 `tokenizer.model`, a tiktoken ranks file (base64 token, rank per line) with GLM-4's
  split pattern; special tokens (<|endoftext|> [MASK] [gMASK] ... ) from
  tokenizer_config.json's added_tokens_decoder, or GLM-4's documented list.

`read_text_spec` reads a checkpoint directory into a `TextSpec` (files to copy into the
artifact, special tokens, chat format, generation defaults); `open_codec` opens an
artifact's. The chat format is the checkpoint's `chat_template` (jinja2) when
tokenizer_config.json has one (ChatGLM2/3 always use their release's chat(): ChatGLM3's
role-token messages, ChatGLM2's "[Round N]" prompt), else GLM-4's documented format, or
plain "role: text" lines.

Presets have random weights, so their text is gibberish, but `--prompt` works on them end
to end: their byte-level tokenizer has ids 0..2 <pad>, <eos>, <bos> and 3..258 the bytes.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from glmc.errors import GlmcError

_SPECIALS = ["<pad>", "<eos>", "<bos>"]
CHATGLM_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
CHATGLM3_ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>"]
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
ROLES = ("system", "user", "assistant", "observation")


def byte_tokenizer_json(vocab_size: int) -> str | None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    if vocab_size < len(_SPECIALS) + 256:
        return None
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in sorted(ByteLevel.alphabet(), key=lambda c: ord(c)):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIALS)
    return tok.to_str()


# ---- what a checkpoint carries ------------------------------------------------------------

@dataclass
class TextSpec:
    kind: str | None                       # tokenizers | sentencepiece | tiktoken; None: no tokenizer
    files: dict[str, bytes]                # artifact file name -> content
    specials: dict[str, int]               # special token text -> id
    chat_format: str                       # template | chatglm3 | glm4 | chatglm2 | plain
    chat_template: str | None = None
    generation: dict = field(default_factory=dict)   # eos_token_id (list), do_sample, temperature, ...
    notes: list[str] = field(default_factory=list)

    def meta(self) -> dict:
        """The manifest's `text` entry (files are stored beside it)."""
        return {"kind": self.kind, "file": next(iter(self.files), None), "specials": self.specials,
                "chat_format": self.chat_format, "chat_template": self.chat_template, "generation": self.generation}


def preset_text_spec(tokenizer_json: str | None, config: dict) -> TextSpec | None:
    if tokenizer_json is None:
        return None
    eos = config.get("eos_token_id")
    return TextSpec("tokenizers", {"tokenizer.json": tokenizer_json.encode()},
                    _TokenizersCodec(tokenizer_json).specials(), "plain",
                    generation={"eos_token_id": eos if isinstance(eos, list) else [] if eos is None else [eos]})


def _json(path: Path) -> dict:
    """An optional JSON object file: {} when absent."""
    from glmc.checkpoint import _read_json

    return _read_json(path, path.name) if path.is_file() else {}


def _is_tiktoken_ranks(data: bytes) -> bool:
    first = data[:200].split(b"\n", 1)[0].split()
    if len(first) != 2 or not first[1].isdigit():
        return False
    try:
        base64.b64decode(first[0], validate=True)
    except ValueError:
        return False
    return True


def generation_defaults(ckpt: Path, config: dict) -> dict:
    """generation_config.json (and the model config's eos ids) as glmc's generation defaults."""
    gen = _json(ckpt / "generation_config.json")
    eos: list[int] = []
    for source in (config.get("eos_token_id"), gen.get("eos_token_id")):
        for t in source if isinstance(source, list) else [] if source is None else [source]:
            if not isinstance(t, int) or isinstance(t, bool):
                raise GlmcError(f"{ckpt}: eos_token_id {t!r} is not a token id")
            if t not in eos:
                eos.append(t)
    out: dict = {"eos_token_id": eos}
    if gen.get("do_sample"):
        for key in ("temperature", "top_p", "top_k"):
            if key in gen and gen[key] is not None:
                out[key] = gen[key]
    if isinstance(gen.get("max_new_tokens"), int):
        out["max_new_tokens"] = gen["max_new_tokens"]
    elif isinstance(gen.get("max_length"), int):
        out["max_length"] = gen["max_length"]
    return out


def read_text_spec(ckpt: Path, config: dict) -> TextSpec | None:
    """The tokenizer, chat format and generation defaults a checkpoint directory carries."""
    tok_cfg = _json(ckpt / "tokenizer_config.json")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):          # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise GlmcError(f"{ckpt / 'tokenizer_config.json'}: chat_template is not a string")
    generation = generation_defaults(ckpt, config)
    notes: list[str] = []
    if (ckpt / "tokenizer.json").is_file():
        data = (ckpt / "tokenizer.json").read_bytes()
        codec = _TokenizersCodec(data.decode())
        return TextSpec("tokenizers", {"tokenizer.json": data}, codec.specials(),
                        "template" if template else "plain", template, generation)
    model = ckpt / "tokenizer.model"
    if not model.is_file():         # no tokenizer: the generation defaults still count
        return TextSpec(None, {}, {}, "plain", None, generation)
    data = model.read_bytes()
    if _is_tiktoken_ranks(data):
        added = tok_cfg.get("added_tokens_decoder") or {}
        specials = {v["content"]: int(k) for k, v in added.items() if isinstance(v, dict) and "content" in v}
        if not specials:
            n = sum(1 for line in data.splitlines() if line.strip())
            specials = {t: n + i for i, t in enumerate(GLM4_SPECIALS)}
        return TextSpec("tiktoken", {"tokenizer.model": data}, specials, "template" if template else "glm4",
                        template, generation)
    import sentencepiece

    try:
        sp = sentencepiece.SentencePieceProcessor(model_proto=data)
    except Exception as e:  # noqa: BLE001 - sentencepiece raises bare RuntimeErrors
        raise GlmcError(f"{model}: neither a sentencepiece model nor a tiktoken ranks file ({e})") from None
    code = ckpt / "tokenization_chatglm.py"
    if code.is_file():
        chatglm3 = "<|observation|>" in code.read_text(errors="replace")
    else:
        chatglm3 = True
        notes.append(f"{ckpt}: no tokenization_chatglm.py; assuming ChatGLM3's special tokens (with role tokens)")
    names = CHATGLM_SPECIALS + (CHATGLM3_ROLES if chatglm3 else [])
    specials = {t: sp.vocab_size() + i for i, t in enumerate(names)}
    # the release's own chat() builds ids (build_chat_input / build_prompt), and its tokenizer does
    # not read role tokens out of text, so a template's text form would tokenize differently
    fmt = "chatglm3" if chatglm3 else "chatglm2"
    return TextSpec("sentencepiece", {"tokenizer.model": data}, specials, fmt, template, generation, notes)


# ---- codecs -------------------------------------------------------------------------------

class Codec:
    """encode(text) -> ids (special tokens written in the text become their ids where the
    original tokenizer does so); decode(ids) -> text without special tokens."""

    def __init__(self, specials: dict[str, int], split_specials: bool):
        self.special_ids = dict(specials)
        self._special_text = {i: t for t, i in specials.items()}
        self._split = None
        if split_specials and specials:
            alts = sorted(specials, key=len, reverse=True)
            self._split = re.compile("(" + "|".join(re.escape(t) for t in alts) + ")")

    def encode(self, text: str) -> list[int]:
        if not text:
            raise GlmcError("the prompt is empty")
        if self._split is None:
            return self._encode_plain(text)
        out: list[int] = []
        for i, part in enumerate(self._split.split(text)):
            if i % 2:
                out.append(self.special_ids[part])
            elif part:
                out.extend(self._encode_plain(part))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode_plain([int(i) for i in ids if int(i) not in self._special_text])

    def token(self, name: str) -> int:
        if name not in self.special_ids:
            raise GlmcError(f"the tokenizer has no special token {name!r}")
        return self.special_ids[name]

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def _decode_plain(self, ids: list[int]) -> str:
        raise NotImplementedError


class _TokenizersCodec(Codec):
    def __init__(self, tokenizer_json: str):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(tokenizer_json)
        super().__init__(self.specials(), split_specials=False)   # tokenizers splits its own added tokens

    def specials(self) -> dict[str, int]:
        return {t.content: i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def _encode_plain(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _decode_plain(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


class _SentencePieceCodec(Codec):
    """ChatGLM2/3: plain text is sentencepiece only (their tokenizers do not read special
    tokens out of text by default); special tokens enter through the chat format."""

    def __init__(self, data: bytes, specials: dict[str, int]):
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_proto=data)
        super().__init__(specials, split_specials=False)
        # the originals decode bos/eos/unk ids to nothing
        for i in (self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()):
            if i >= 0:
                self._special_text.setdefault(i, "")

    def _encode_plain(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def _decode_plain(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


class _TiktokenCodec(Codec):
    """GLM-4: tiktoken BPE over GLM-4's split pattern; special tokens in text are split out
    first (they are added tokens of the original tokenizer)."""

    def __init__(self, data: bytes, specials: dict[str, int]):
        import tiktoken

        ranks = {}
        for line in data.splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        self._enc = tiktoken.Encoding(name="glm4", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens={})
        self._bytes = {r: t for t, r in ranks.items()}
        super().__init__(specials, split_specials=True)

    def _encode_plain(self, text: str) -> list[int]:
        return self._enc.encode(text, disallowed_special=())

    def _decode_plain(self, ids: list[int]) -> str:
        return b"".join(self._bytes.get(i, b"") for i in ids).decode("utf-8", errors="replace")


def codec_for(kind: str, data: bytes, specials: dict[str, int]) -> Codec:
    if kind == "tokenizers":
        return _TokenizersCodec(data.decode())
    if kind == "sentencepiece":
        return _SentencePieceCodec(data, specials)
    if kind == "tiktoken":
        return _TiktokenCodec(data, specials)
    raise GlmcError(f"unknown tokenizer kind {kind!r} (artifact from a newer glmc?)")


def open_codec(root: Path, meta: dict | None) -> "ChatCodec | None":
    """The artifact's tokenizer: from its manifest `text` entry, or a bare tokenizer.json."""
    if meta is None:                # artifacts from before the manifest's `text` entry
        tok = root / "tokenizer.json"
        if not tok.is_file():
            return None
        meta = {"kind": "tokenizers", "file": "tokenizer.json", "specials": {}, "chat_format": "plain"}
    if meta.get("file") is None:
        return None
    data = (root / meta["file"]).read_bytes()
    return ChatCodec(codec_for(meta["kind"], data, meta.get("specials", {})), meta)


# ---- chat ---------------------------------------------------------------------------------

def check_messages(messages) -> list[dict]:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise GlmcError("chat messages must be a non-empty list of {'role': ..., 'content': ...}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content", ""), str):
            raise GlmcError(f"chat message {i} must be a dict with a string 'role' and 'content'")
        if m["role"] not in ROLES:
            raise GlmcError(f"chat message {i}: role {m['role']!r} is not one of {', '.join(ROLES)}")
        out.append(m)
    return out


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def render_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **extra) -> str:
    """A transformers-style chat template rendered with jinja2 (sandboxed)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise GlmcError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **extra)
    except jinja2.TemplateError as e:
        raise GlmcError(f"chat template: {e}") from None


class ChatCodec:
    """A codec plus the artifact's chat format."""

    def __init__(self, codec: Codec, meta: dict):
        self.codec, self.meta = codec, meta
        self.encode, self.decode = codec.encode, codec.decode

    @property
    def chat_format(self) -> str:
        return self.meta.get("chat_format", "plain")

    def chat_ids(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation, ending with the assistant's turn opened."""
        messages = check_messages(messages)
        fmt, c = self.chat_format, self.codec
        if fmt == "template":
            text = render_template(self.meta["chat_template"], messages, add_generation_prompt)
            return c.encode(text) if text else []
        if fmt == "chatglm3":
            ids = [c.token("[gMASK]"), c.token("sop")]
            for m in messages:
                content = m.get("content", "")
                if m["role"] == "system" and "tools" in m:
                    content = content + "\n" + json.dumps(m["tools"], indent=4, ensure_ascii=False)
                ids.append(c.token(f"<|{m['role']}|>"))
                ids += c._encode_plain(f"{m.get('metadata', '')}\n")
                if content:
                    ids += c._encode_plain(content)
            return ids + ([c.token("<|assistant|>")] if add_generation_prompt else [])
        if fmt == "glm4":
            text = "[gMASK]<sop>" + "".join(f"<|{m['role']}|>{m.get('metadata', '')}\n{m['content']}"
                                             for m in messages if m.get("content"))
            return c.encode(text + ("<|assistant|>" if add_generation_prompt else ""))
        if fmt == "chatglm2":
            turns = [m for m in messages]
            if any(m["role"] not in ("user", "assistant") for m in turns):
                raise GlmcError("ChatGLM2's chat format has only user and assistant turns")
            prompt, n = "", 0
            for m in turns:
                if m["role"] == "user":
                    n += 1
                    prompt += f"[Round {n}]\n\n问：{m['content']}\n\n答："
                else:
                    prompt += f"{m['content']}\n\n"
            return [c.token("[gMASK]"), c.token("sop")] + c._encode_plain(prompt)
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return c.encode(text + ("assistant:" if add_generation_prompt else ""))

    def reply(self, text: str) -> str:
        """An assistant turn's text as the releases return it: ChatGLM3 / GLM-4 turns open with a
        metadata line (empty for plain replies), which is dropped with surrounding space."""
        if self.chat_format == "plain":
            return text
        if "\n" in text:
            metadata, content = text.split("\n", 1)
            if not metadata.strip():
                text = content
        return text.strip()

    def opening_filter(self):
        """For a reply streamed in pieces: a function that drops the empty metadata line opening
        a ChatGLM3 / GLM-4 turn (newlines before the first text), then passes text as it is."""
        lead = self.chat_format != "plain"

        def strip(text: str) -> str:
            nonlocal lead
            if lead:
                text = text.lstrip("\n")
                lead = not text
            return text

        return strip

    def stop_ids(self) -> set[int]:
        """Tokens that end an assistant turn in this chat format (beside the eos ids)."""
        if self.chat_format in ("chatglm3", "glm4", "template"):
            return {self.codec.special_ids[t] for t in ("<|user|>", "<|observation|>") if t in self.codec.special_ids}
        return set()

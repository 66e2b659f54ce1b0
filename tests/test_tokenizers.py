"""glmc's tokenizers and chat formats against the releases' own tokenization code.

ChatGLM2/3 ship a sentencepiece tokenizer.model (absent from ../shared: LFS upstream), so
one of the same kind is trained here with sentencepiece. GLM-4-9B-chat's tiktoken ranks
file is the real one. transformers-format repos ship tokenizer.json: one is trained with
`tokenizers` and compared with transformers' PreTrainedTokenizerFast. Token ids must be
identical on mixed Chinese / English / code text (>= 1000 characters) with special tokens.

Harness shims for the originals under transformers 5 (no change to tokenization):
`_pad` accepts the `padding_side` argument transformers 5 passes; `batch_encode_plus`
(removed in transformers 5) adds the special-token prefix to the ids build_chat_input
made, through the original's own build_inputs_with_special_tokens, as transformers 4 did.
"""

from __future__ import annotations

import json
import shutil

import pytest

from glmc.tokenizer import codec_for, read_text_spec
from tests.chatglm_reference import module, require_reference

MIXED = (
    "GLM 是清华大学 KEG 实验室和智谱 AI 共同训练的双语语言模型。It was trained on 1T tokens of English and "
    "Chinese text, 包括代码与数学。\n\n"
    "def fibonacci(n: int) -> list[int]:\n    a, b = 0, 1\n    out = []\n    for _ in range(n):\n"
    "        out.append(a)\n        a, b = b, a + b   # 注释：斐波那契\n    return out\n\n"
    "量化（INT4）后，模型只需要 4 张 RTX 3090 (24G) 即可推理；FP32 softmax 避免了溢出。Numbers: 3.14159, "
    "2048, 1e-5, 0x1F. Mixed:你好world，hello世界! \t tabs and   spaces.\n"
    "URL: https://example.com/path?q=1&r=2 — em dash, “quotes”, 'single', emoji 😀🚀, ümlaut, café.\n"
    "表格 | 列1 | 列2 |\n|---|---|\n| 值 | 42 |\n"
    "SQL: SELECT name, COUNT(*) FROM users WHERE age > 18 GROUP BY name;\n"
    "长句子测试：在人工智能领域，大规模预训练语言模型已经成为自然语言处理的基础设施，"
    "它们在理解、生成、推理等任务上表现出色。\n"
)
TEXT = MIXED * 2
assert len(TEXT) >= 1000


def _sentencepiece_model(path):
    import sentencepiece as spm

    lines = [ln for ln in (MIXED * 3).splitlines() if ln.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(path / "sp"), vocab_size=600, hard_vocab_limit=False,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, split_digits=True,
        remove_extra_whitespaces=False, minloglevel=2)
    (path / "sp.model").rename(path / "tokenizer.model")
    return path / "tokenizer.model"


def _original_chatglm_tokenizer(release, model_file):
    base = module(require_reference() / release, "tokenization_chatglm").ChatGLMTokenizer

    class Shimmed(base):
        def _pad(self, *args, padding_side=None, **kwargs):
            return super()._pad(*args, **kwargs)

        def batch_encode_plus(self, batch, **kwargs):     # as transformers 4 did: the prefix added
            return {"input_ids": [self.build_inputs_with_special_tokens(ids) for ids in batch]}

    return Shimmed(vocab_file=str(model_file))


def _release_dir(tmp_path, release, **extra_files):
    """A checkpoint directory's text side, as the release ships it."""
    d = tmp_path / release
    d.mkdir()
    for f in ("tokenization_chatglm.py", "tokenizer_config.json"):
        src = require_reference() / release / f
        if src.is_file():
            shutil.copy(src, d / f)
    for name, content in extra_files.items():
        (d / name).write_text(content)
    return d


@pytest.mark.parametrize("release", ["chatglm2-6b", "chatglm3-6b"])
def test_sentencepiece_tokenizer_matches_the_original(release, tmp_path):
    d = _release_dir(tmp_path, release)
    model_file = _sentencepiece_model(d)
    orig = _original_chatglm_tokenizer(release, model_file)
    spec = read_text_spec(d, {})
    assert spec.kind == "sentencepiece"
    codec = codec_for(spec.kind, spec.files["tokenizer.model"], spec.specials)
    ids = codec.encode(TEXT)
    assert ids == orig.encode(TEXT, add_special_tokens=False)
    assert codec.decode(ids) == orig.decode(ids)
    # the special tokens sit where the original puts them
    for name, i in spec.specials.items():
        assert orig.get_command(name) == i, name
    assert ("<|user|>" in spec.specials) == (release == "chatglm3-6b")
    assert spec.chat_format == ("chatglm3" if release == "chatglm3-6b" else "chatglm2")


def test_chatglm3_chat_ids_match_build_chat_input(tmp_path):
    from glmc.tokenizer import ChatCodec

    d = _release_dir(tmp_path, "chatglm3-6b")
    orig = _original_chatglm_tokenizer("chatglm3-6b", _sentencepiece_model(d))
    spec = read_text_spec(d, {})
    chat = ChatCodec(codec_for(spec.kind, spec.files["tokenizer.model"], spec.specials), spec.meta())
    history = [{"role": "system", "content": "你是一个助手。 Be brief."},
               {"role": "user", "content": "def f(x): return x*2 是什么？"},
               {"role": "assistant", "content": "A function 把 x 乘以 2.", "metadata": ""}]
    want = orig.build_chat_input("再写一个 (and in English)", history=history)["input_ids"][0]
    got = chat.chat_ids(history + [{"role": "user", "content": "再写一个 (and in English)"}])
    assert got == want
    assert chat.stop_ids() == {orig.get_command("<|user|>"), orig.get_command("<|observation|>")}


def test_chatglm2_chat_ids_match_build_prompt(tmp_path):
    from glmc.tokenizer import ChatCodec

    d = _release_dir(tmp_path, "chatglm2-6b")
    orig = _original_chatglm_tokenizer("chatglm2-6b", _sentencepiece_model(d))
    spec = read_text_spec(d, {})
    chat = ChatCodec(codec_for(spec.kind, spec.files["tokenizer.model"], spec.specials), spec.meta())
    prompt = orig.build_prompt("第二个问题 second", history=[("第一个 question", "answer 一")])
    want = orig.build_inputs_with_special_tokens(orig.encode(prompt, add_special_tokens=False))
    got = chat.chat_ids([{"role": "user", "content": "第一个 question"}, {"role": "assistant", "content": "answer 一"},
                         {"role": "user", "content": "第二个问题 second"}])
    assert got == want


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    ref = require_reference() / "glm-4-9b-chat"
    base = module(ref, "tokenization_chatglm").ChatGLM4Tokenizer
    orig = base.from_pretrained(str(ref))
    d = tmp_path_factory.mktemp("glm4")
    for f in ("tokenizer.model", "tokenizer_config.json", "generation_config.json", "tokenization_chatglm.py"):
        shutil.copy(ref / f, d / f)
    config = json.loads((ref / "config.json").read_text())
    return orig, d, read_text_spec(d, config)


def test_glm4_tiktoken_tokenizer_matches_the_original(glm4):
    orig, _, spec = glm4
    assert spec.kind == "tiktoken" and spec.specials["<|user|>"] == 151336
    codec = codec_for(spec.kind, spec.files["tokenizer.model"], spec.specials)
    text = TEXT + "<|user|>\n问题<|assistant|>回答<|observation|>[gMASK]<sop><|endoftext|>" + TEXT[:300]
    ids = codec.encode(text)
    assert ids == orig.encode(text, add_special_tokens=False)
    assert sum(i >= 151329 for i in ids) == 6
    plain = codec.encode(TEXT)
    assert codec.decode(plain) == orig.decode(plain) == TEXT
    for name, i in spec.specials.items():
        assert orig.convert_tokens_to_ids(name) == i, name


def test_glm4_chat_template_and_generation_config(glm4):
    from glmc.tokenizer import ChatCodec

    orig, _, spec = glm4
    assert spec.chat_format == "template"
    assert spec.generation == {"eos_token_id": [151329, 151336, 151338], "temperature": 0.8, "top_p": 0.8,
                               "max_length": 128000}
    chat = ChatCodec(codec_for(spec.kind, spec.files["tokenizer.model"], spec.specials), spec.meta())
    messages = [{"role": "system", "content": "你是一个助手"}, {"role": "user", "content": "Hello 你好, what is 2+2?"},
                {"role": "assistant", "content": "4。"}, {"role": "user", "content": "写一段 Python 代码"}]
    want = list(orig.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    assert chat.chat_ids(messages) == want
    # GLM-4's documented format, used when a checkpoint has no template, gives the same ids
    assert ChatCodec(chat.codec, dict(spec.meta(), chat_format="glm4", chat_template=None)).chat_ids(messages) == want
    # tools go through the template too
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "str"}}}]
    with_tools = [{"role": "system", "content": "", "tools": tools}, {"role": "user", "content": "北京天气?"}]
    assert chat.chat_ids(with_tools) == list(orig.apply_chat_template(with_tools, add_generation_prompt=True,
                                                                      tokenize=True, return_dict=False))


def test_tokenizer_json_matches_transformers(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>"]
    tok.train_from_iterator([MIXED] * 3, trainers.BpeTrainer(vocab_size=800, special_tokens=specials,
                                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    template = "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}" \
               "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), chat_template=template)
    spec = read_text_spec(tmp_path, {})
    codec = codec_for(spec.kind, spec.files["tokenizer.json"], spec.specials)
    text = TEXT + "<|user|>\nhi<|assistant|>"
    assert codec.encode(text) == fast.encode(text, add_special_tokens=False)
    from glmc.tokenizer import ChatCodec

    messages = [{"role": "user", "content": "你好 hello"}]
    assert ChatCodec(codec, spec.meta()).chat_ids(messages) == list(
        fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def test_compiled_chatglm3_release_chats_like_the_original(tmp_path):
    """A ChatGLM3 release (original classes, sentencepiece tokenizer, generation_config with an
    eos list and sampling defaults) compiled and chatted with: same prompt ids as
    build_chat_input, same greedy reply as the original model, stopping where ChatGLM3 does."""
    from click.testing import CliRunner

    import glmc
    from glmc.cli import main
    from tests.chatglm_reference import greedy, original_model, save_release

    folder = require_reference() / "chatglm3-6b"
    ckpt = save_release(original_model(folder, padded_vocab_size=640), folder, tmp_path / "ckpt")
    model = original_model(folder, padded_vocab_size=640)          # same seed: same weights
    orig = _original_chatglm_tokenizer("chatglm3-6b", _sentencepiece_model(ckpt))
    shutil.copy(folder / "tokenizer_config.json", ckpt)
    user, obs = orig.get_command("<|user|>"), orig.get_command("<|observation|>")
    (ckpt / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, user, obs], "do_sample": True, "temperature": 0.6, "top_p": 0.7, "max_new_tokens": 12}))
    rt = glmc.load(glmc.compile(ckpt, tmp_path / "a.glmc", progress=False, max_seq_len=128, verify=False))
    assert rt.manifest["text"]["kind"] == "sentencepiece" and rt.manifest["text"]["chat_format"] == "chatglm3"
    assert {2, user, obs} <= rt.eos_ids
    assert rt._defaults(None, None, None, None) == (12, 0.6, 0, 0.7)          # generation_config's
    messages = [{"role": "system", "content": "你是一个助手。"}, {"role": "user", "content": "hello 你好"}]
    ids = rt.chat_ids(messages)
    assert ids == orig.build_chat_input("hello 你好", history=messages[:1])["input_ids"][0]
    want = greedy(model, ids, 12)
    cut = next((i for i, t in enumerate(want) if t in {2, user, obs}), len(want))
    got = [t.id for t in rt.stream_chat(messages, temperature=0.0)]
    assert got == want[:cut] and cut >= 3, (want, cut)
    # the CLI: two turns through stdin, each reply printed after "glm> "
    r = CliRunner().invoke(main, ["chat", str(rt.path), "--temperature", "0", "--system", "你是一个助手。"],
                           input="hello 你好\nsecond turn\n/quit\n")
    assert r.exit_code == 0, r.output
    assert r.output.count("glm> ") == 2


def test_reply_drops_the_empty_metadata_line_of_glm_turns(glm4):
    from glmc.tokenizer import ChatCodec

    _, _, spec = glm4
    chat = ChatCodec(codec_for(spec.kind, spec.files["tokenizer.model"], spec.specials), spec.meta())
    assert chat.reply("\n你好！ Hello.\n") == "你好！ Hello."
    assert chat.reply("get_weather\n{\"city\": \"北京\"}") == "get_weather\n{\"city\": \"北京\"}"   # a tool call keeps it
    plain = ChatCodec(chat.codec, dict(spec.meta(), chat_format="plain"))
    assert plain.reply("\n as made \n") == "\n as made \n"


def test_generation_config_counts_without_a_tokenizer(tmp_path):
    from glmc.tokenizer import open_codec

    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [1, 7], "do_sample": True, "temperature": 0.5, "top_p": 0.9, "max_new_tokens": 20}))
    spec = read_text_spec(tmp_path, {"eos_token_id": 2})
    assert spec.kind is None and spec.files == {}
    assert spec.generation == {"eos_token_id": [2, 1, 7], "temperature": 0.5, "top_p": 0.9, "max_new_tokens": 20}
    assert open_codec(tmp_path, spec.meta()) is None

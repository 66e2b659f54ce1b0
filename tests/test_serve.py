"""`glmc serve` in a subprocess on 127.0.0.1, driven by the real `openai` client.

The model is a tiny glm with a byte-level tokenizer (vocabulary = 3 specials + 256 bytes),
so every generated token is text and a reply's text fixes its tokens. Greedy replies are
compared with `Runtime.generate` of the same prompt alone.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai", reason="openai is a test dependency (pip install -e '.[test]')")
httpx = pytest.importorskip("httpx")

import glmc  # noqa: E402
from glmc.tokenizer import byte_tokenizer_json  # noqa: E402
from tests.conftest import make_hf_model  # noqa: E402

KEY = "test-key"
SPEC = dict(model_type="glm", vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.5, eos_token_id=None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(artifact, port, *args):
    proc = subprocess.Popen([sys.executable, "-m", "glmc.cli", "serve", str(artifact), "--port", str(port),
                             "--api-key", KEY, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    for _ in range(300):
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("server did not start")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    make_hf_model(SPEC).save_pretrained(root / "ckpt")
    (root / "ckpt" / "tokenizer.json").write_text(byte_tokenizer_json(259))
    return glmc.compile(root / "ckpt", root / "bytes.glmc", progress=False, max_seq_len=96, verify=False)


@pytest.fixture(scope="module")
def server(artifact):
    port = _free_port()
    proc = _start(artifact, port, "--max-batch", 4, "--max-queue", 4)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def rt(artifact):
    return glmc.load(artifact)


def _client(server, key=KEY):
    return openai.OpenAI(base_url=server + "/v1", api_key=key, max_retries=0, timeout=60)


def _alone(rt, ids, n):
    return rt.decode_text(rt.generate([ids], max_new_tokens=n)[0])


def test_completion_chat_and_streamed_chat(server, rt):
    c = _client(server)
    r = c.completions.create(model="bytes", prompt="Hello, glmc", max_tokens=12, temperature=0)
    assert r.choices[0].text == _alone(rt, rt.encode("Hello, glmc"), 12)
    assert r.usage.prompt_tokens == 11 and r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    want = _alone(rt, rt.chat_ids(messages), 10)
    r = c.chat.completions.create(model="bytes", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(model="bytes", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 10
    assert [m.id for m in c.models.list().data] == ["bytes"]


def test_stop_strings_and_seeds(server, rt):
    c = _client(server)
    full = _alone(rt, rt.encode("stop here"), 16)
    stop = full[5:7]
    r = c.completions.create(model="bytes", prompt="stop here", max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    a, b, other = (c.completions.create(model="bytes", prompt="sample", max_tokens=12, temperature=1.0, seed=s)
                   .choices[0].text for s in (7, 7, 8))
    assert a == b and a != other


def test_eight_concurrent_clients_each_get_their_alone_tokens(server, rt):
    c = _client(server)
    prompts = [f"prompt number {i} " + "x" * (3 * i) for i in range(8)]
    lengths = [5 + 3 * i for i in range(8)]

    def ask(i):
        return c.completions.create(model="bytes", prompt=prompts[i], max_tokens=lengths[i], temperature=0).choices[0].text

    with cf.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(8)))
    assert got == [_alone(rt, rt.encode(p), n) for p, n in zip(prompts, lengths)]


def test_client_disconnect_mid_stream_frees_its_row(server, rt):
    body = {"prompt": "a long story", "max_tokens": 80, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    # the others are not stalled, and the abandoned row is freed
    r = _client(server).completions.create(model="bytes", prompt="after", max_tokens=6, temperature=0)
    assert r.choices[0].text == _alone(rt, rt.encode("after"), 6)
    for _ in range(100):
        if httpx.get(server + "/health").json()["active"] == 0:
            break
        time.sleep(0.05)
    assert httpx.get(server + "/health").json()["active"] == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(max_tokens=5, extra_body={"bogus": 1}), "unknown field 'bogus'"),
    (dict(max_tokens=5, prompt="p" * 200), "context_length_exceeded"),
    (dict(max_tokens=5, n=2), "n"),
])
def test_bad_requests_get_400_and_an_error_object(server, kwargs, message):
    args = dict(dict(model="bytes", prompt="hi"), **kwargs)
    with pytest.raises(openai.BadRequestError) as e:
        _client(server).completions.create(**args)
    assert message in json.dumps(e.value.body)
    assert httpx.get(server + "/health").status_code == 200


def test_malformed_json_and_wrong_key(server):
    r = httpx.post(server + "/v1/completions", content=b"{not json", headers={"Authorization": f"Bearer {KEY}",
                                                                               "Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError):
        _client(server, key="wrong").completions.create(model="bytes", prompt="hi", max_tokens=2)


def test_bounded_load_is_answered_or_429(server):
    c = _client(server)

    def ask(i):
        try:
            c.completions.create(model="bytes", prompt=f"load {i}", max_tokens=20, temperature=0.7, seed=i)
            return 200
        except openai.RateLimitError:
            return 429
        except openai.APIStatusError as e:
            return e.status_code

    for _ in range(2):
        with cf.ThreadPoolExecutor(24) as pool:
            codes = list(pool.map(ask, range(24)))
        assert set(codes) <= {200, 429} and codes.count(200) >= 8, codes
    assert httpx.get(server + "/health").json()["status"] == "ok"


def test_sigterm_finishes_in_flight_requests(artifact):
    port = _free_port()
    proc = _start(artifact, port, "--max-batch", 2)
    body = {"prompt": "in flight", "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        os.kill(proc.pid, signal.SIGTERM)
        rest = [ln for ln in lines if ln]
    assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
    # uvicorn finishes the in-flight requests, then re-raises the signal it captured
    assert proc.wait(timeout=60) in (0, -signal.SIGTERM)


def test_artifact_without_the_step_graph_is_served_one_request_at_a_time(artifact, tmp_path):
    """--kv-cache fp16 keeps the exported extend entry (lean.py declines it): the engine then
    runs requests one after another through Runtime, with the same tokens."""
    import threading

    from glmc.serve import Engine, Job

    art = glmc.compile(artifact.parent / "ckpt", tmp_path / "fp16kv.glmc", progress=False, max_seq_len=96,
                       verify=False, kv_cache="fp16")
    rt = glmc.load(art)
    assert rt.executor.generation == "extend"
    engine = Engine(rt, max_batch=4)
    assert not engine.batched and engine.max_batch == 1
    prompts, outs, done = [rt.encode("first one"), rt.encode("second")], [[], []], [threading.Event(), threading.Event()]
    for i, ids in enumerate(prompts):
        def deliver(ev, i=i):
            if ev[0] == "token" and ev[1] is not None:
                outs[i].append(ev[1])
            elif ev[0] == "done":
                done[i].set()
        engine.submit(Job(ids, 7, deliver=deliver))
    assert all(d.wait(60) for d in done)
    engine.stop()
    assert outs == [rt.generate([p], max_new_tokens=7)[0] for p in prompts]


def test_adapters_are_served_as_models_in_one_batch(tmp_path):
    """--adapter NAME=DIR on an artifact with run-time slots: concurrent requests for the base
    and two adapters share the batch, and each gets the tokens Runtime.generate gives it alone."""
    peft = pytest.importorskip("peft", reason="peft is a test dependency (pip install -e '.[test]')")
    import torch

    make_hf_model(SPEC).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "tokenizer.json").write_text(byte_tokenizer_json(259))
    art = glmc.compile(tmp_path / "ckpt", tmp_path / "bytes.glmc", progress=False, max_seq_len=96, verify=False,
                       lora_slots=2, lora_rank=8)
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                              init_lora_weights=False)
        peft.get_peft_model(make_hf_model(SPEC), cfg).save_pretrained(tmp_path / name)
    rt = glmc.load(art)
    rt.add_adapter("a", tmp_path / "a")
    rt.add_adapter("b", tmp_path / "b")
    prompts = [f"row {i} says" for i in range(6)]
    models = ["a", "b", "bytes", "a", "b", "bytes"]
    want = [rt.decode_text(rt.generate(p, max_new_tokens=10, adapter=None if m == "bytes" else m)[0])
            for p, m in zip(prompts, models)]
    assert want[0] != rt.decode_text(rt.generate(prompts[0], max_new_tokens=10)[0])      # the adapter matters
    port = _free_port()
    proc = _start(art, port, "--max-batch", 4, "--adapter", f"a={tmp_path / 'a'}", "--adapter", f"b={tmp_path / 'b'}")
    try:
        c = _client(f"http://127.0.0.1:{port}")
        assert [m.id for m in c.models.list().data] == ["bytes", "a", "b"]

        def ask(i):
            r = c.completions.create(model=models[i], prompt=prompts[i], max_tokens=10, temperature=0)
            return r.model, r.choices[0].text

        with cf.ThreadPoolExecutor(6) as pool:
            got = list(pool.map(ask, range(6)))
        assert got == list(zip(models, want))
        with pytest.raises(openai.NotFoundError, match="the model 'c' does not exist"):
            c.completions.create(model="c", prompt="hi", max_tokens=2)
    finally:
        proc.terminate()
        proc.wait(timeout=60)

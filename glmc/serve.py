"""`glmc serve`: an OpenAI-compatible HTTP server with continuous batching.

Engine: one thread owns the artifact's executor and a KV cache of `max_batch` rows. Between
decode steps it admits waiting requests into free rows (each prompt prefilled into its own
row), then runs one decode step over every row; a finished or abandoned request frees its
row at once. Rows are independent (attention reads only the row's own cache, quantized
matmuls quantize activations per row), so a request gets the tokens it would get alone.
Artifacts whose generation runs the exported extend graph (no lean step graph) are served
one request at a time.

HTTP (FastAPI on uvicorn): POST /v1/chat/completions, POST /v1/completions (both with
`stream`: server-sent events as the OpenAI API sends them), GET /v1/models, GET /health.
Errors are OpenAI error objects: 400 (malformed JSON, unknown or invalid fields, a prompt
longer than the artifact holds), 401 (api key), 429 (queue full), 503 (shutting down).
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Literal, Optional, Sequence, Union

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from glmc.errors import GlmcError
from glmc.sampling import check_sampling, choose


class QueueFull(Exception):
    pass


@dataclass
class Job:
    ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_ids: frozenset = frozenset()
    stop_text: tuple = ()
    deliver: Callable = print              # deliver(event), called on the engine thread ...
    sink: tuple | None = None              # ... or (event loop, asyncio.Queue): batched per step
    quiet: bool = False                    # no per-token events: the reply is job.shown at "done"
    cancelled: bool = False
    made: list = field(default_factory=list)
    shown: str = ""
    cut: bool = False                      # a stop string ended the text
    row: int = -1
    position: int = 0
    adapter_slot: int = 0                  # a run-time adapter's slot (serve --adapter), 0: none

    def __post_init__(self):
        self.rng = np.random.default_rng(self.seed) if self.temperature > 0 else None


class Engine:
    """Continuous batching over a Runtime (see the module docstring)."""

    def __init__(self, runtime, max_batch: int = 8, max_queue: int = 64):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise GlmcError(f"--max-batch must be an integer >= 1, got {max_batch!r}")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise GlmcError(f"--max-queue must be an integer >= 0, got {max_queue!r}")
        self.rt, self.ex = runtime, runtime.executor
        self.batched = getattr(self.ex, "generation", None) == "step"
        self.max_batch = max_batch if self.batched else 1
        self.max_queue = max_queue
        self.pending: collections.deque[Job] = collections.deque()
        self.active: dict[int, Job] = {}
        self.cond = threading.Condition()
        self.stopping = False
        self.cache = self.ex.new_cache(self.max_batch) if self.batched else None
        self.views: dict[int, object] = {}      # rows [0, n) of the cache, with its bound step
        self.steps = 0
        self.outbox: list = []                  # (sink, event) posted once per engine iteration
        self.thread = threading.Thread(target=self._loop, name="glmc-engine", daemon=True)
        self.thread.start()

    # ---- called from the server --------------------------------------------------------

    def submit(self, job: Job) -> Job:
        with self.cond:
            if self.stopping:
                raise GlmcError("the server is shutting down")
            if len(self.pending) >= self.max_queue + max(0, self.max_batch - len(self.active)):
                raise QueueFull()
            self.pending.append(job)
            self.cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        job.cancelled = True
        with self.cond:
            if job in self.pending:
                self.pending.remove(job)

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout=60)

    # ---- the engine thread ------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.active and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.pending and not self.active:
                    return
                admit = []
                while self.pending and len(self.active) + len(admit) < self.max_batch:
                    admit.append(self.pending.popleft())
            try:
                if not self.batched:
                    for job in admit:
                        self._alone(job)
                    continue
                self._start(admit)
                if self.active:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the server
                for job in list(self.active.values()) + admit:
                    self._finish(job, "error", str(e))
            finally:
                self._flush()

    def _deliver(self, job: Job, event: tuple) -> None:
        if job.quiet and event[0] == "token":
            return
        if job.sink is None:
            job.deliver(event)
        else:
            self.outbox.append((job.sink, event))

    def _flush(self) -> None:
        """One wake-up per event loop per engine iteration, not one per token: the server's
        thread then takes the GIL once per step."""
        by_loop: dict = {}
        for (loop, queue), event in self.outbox:
            by_loop.setdefault(loop, []).append((queue, event))
        self.outbox = []
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _start(self, jobs: list[Job]) -> None:
        """Admit jobs into free rows; each run of consecutive rows is prefilled in one call
        (right-padded: padding sits after a row's last token, which never sees it)."""
        jobs = [j for j in jobs if not j.cancelled]
        free = [b for b in range(self.max_batch) if b not in self.active]
        for job, b in zip(jobs, free):
            job.row = b
            self.cache.adapter_slot[b] = job.adapter_slot
        runs: list[list[Job]] = []
        for job in jobs:
            if runs and runs[-1][-1].row + 1 == job.row:
                runs[-1].append(job)
            else:
                runs.append([job])
        for run in runs:
            T = max(len(j.ids) for j in run)
            ids = np.full((len(run), T), self.rt.pad_id, np.int64)
            mask = np.zeros((len(run), T), np.int64)
            for i, j in enumerate(run):
                ids[i, :len(j.ids)], mask[i, :len(j.ids)] = j.ids, 1
            logits = self.ex.prefill(self.cache.rows(run[0].row, run[-1].row + 1), ids, mask)
            for j, lg in zip(run, logits):
                j.position = len(j.ids)
                self.active[j.row] = j
                self._emit(j, lg)

    def _step(self) -> None:
        B = max(self.active) + 1                 # rows past the last one in use are not computed
        if B not in self.views:
            # a view per batch width, each with its decode binding (and a split step's plan, made on
            # its second step): rows joining and leaving change the width often. With run-time
            # adapters one view at a time: a view's binding may hold gathered adapter tables
            self.views = {**(self.views if getattr(self.ex, "lora", None) is None else {}), B: self.cache.rows(0, B)}
        ids = np.full((B, 1), self.rt.pad_id, np.int64)
        position = np.zeros(B, np.int64)
        for b, job in self.active.items():
            ids[b, 0], position[b] = job.made[-1], job.position
        logits = self.ex.decode(self.views[B], ids, position)[:, 0]
        self.steps += 1
        for b, job in list(self.active.items()):
            job.position += 1
            self._emit(job, logits[b])

    def _emit(self, job: Job, logits: np.ndarray) -> None:
        if job.cancelled:
            self._finish(job, None)
            return
        self._take(job, choose(logits, job.rng, job.temperature, job.top_k, job.top_p))

    def _take(self, job: Job, t: int) -> bool:
        """Token t for the job: delivered, or ending it; True once the job has finished."""
        if t in job.stop_ids:
            self._finish(job, "stop")
            return True
        job.made.append(t)
        text, stop = self._text(job)
        self._deliver(job, ("token", t, text))
        if stop:
            self._finish(job, "stop")
        elif len(job.made) >= job.max_tokens or job.position + 1 >= self.rt.max_seq_len:
            self._finish(job, "length")
        else:
            return False
        return True

    def _text(self, job: Job) -> tuple[str, bool]:
        """The text this token adds (an incomplete UTF-8 character is held back) and whether a
        stop string appeared (the text is cut before it)."""
        if self.rt.codec is None:
            return "", False
        full = self.rt.codec.decode(job.made)
        if full.endswith("\ufffd"):
            return "", False
        for s in job.stop_text:
            at = full.find(s, max(0, len(job.shown) - len(s)))
            if at >= 0:
                new, job.shown = full[len(job.shown):at] if at > len(job.shown) else "", full[:at]
                job.cut = True
                return new, True
        new, job.shown = full[len(job.shown):], full
        return new, False

    def _finish(self, job: Job, reason: str | None, message: str | None = None) -> None:
        if job.row >= 0:
            self.active.pop(job.row, None)
            if self.cache is not None:
                self.cache.adapter_slot[job.row] = 0        # a free row runs (padding) with no adapter
            job.row = -1
        if reason is None:
            return
        if reason != "error" and not job.cut and self.rt.codec is not None:
            tail = self.rt.codec.decode(job.made)[len(job.shown):]       # a held-back partial character
            if tail:
                job.shown += tail
                self._deliver(job, ("token", None, tail))
        self._deliver(job, ("done", reason, message))

    def _alone(self, job: Job) -> None:
        """Artifacts without the step graph: one request at a time through Runtime."""
        for step in self.rt._steps([job.ids], job.max_tokens, job.temperature, job.top_k, job.top_p, job.seed,
                                   True, set(job.stop_ids)):
            if job.cancelled:
                return
            job.position = len(job.ids) + len(job.made)
            finished = self._take(job, step[0])
            self._flush()
            if finished:
                return


def _put_all(items) -> None:
    for queue, event in items:
        queue.put_nowait(event)


# ---- HTTP ----------------------------------------------------------------------------------

class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[dict] = None
    n: int = Field(default=1, ge=1, le=1)
    user: Optional[str] = None
    frequency_penalty: Optional[float] = Field(default=None, ge=0, le=0)
    presence_penalty: Optional[float] = Field(default=None, ge=0, le=0)


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "observation"]
    content: str
    name: Optional[str] = None


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: Union[str, list[int]]
    echo: bool = False


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
           param: str | None = None):
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def make_app(runtime, engine: Engine, model_name: str, api_key: str | None = None):
    app = FastAPI(title="glmc", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])
        kind = first.get("type", "")
        if kind == "json_invalid":
            return _error(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip())
        if kind == "extra_forbidden":
            return _error(400, f"unknown field '{where}'", param=where)
        return _error(400, f"{where or 'body'}: {first.get('msg', 'invalid')}", param=where or None)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return _error(401, "invalid or missing API key", code="invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": len(engine.active), "waiting": len(engine.pending)}

    @app.get("/v1/models")
    async def models():
        data = [{"id": model_name, "object": "model", "created": 0, "owned_by": "glmc"}]
        data += [{"id": name, "object": "model", "created": 0, "owned_by": "glmc", "parent": model_name}
                 for name in runtime.adapters]
        return {"object": "list", "data": data}

    def _job(req: _Common, ids: list[int], stop_ids: set, queue: asyncio.Queue, loop) -> Job | object:
        slot = runtime.adapters.get(req.model, 0)
        if runtime.adapters and not slot and req.model not in (None, model_name):
            names = ", ".join([model_name, *runtime.adapters])
            return _error(404, f"the model '{req.model}' does not exist (this server has: {names})",
                          code="model_not_found", param="model")
        room = runtime.max_seq_len - len(ids)
        if room < 1:
            return _error(400, f"the prompt has {len(ids)} tokens; this model holds {runtime.max_seq_len}",
                          code="context_length_exceeded", param="messages")
        limit = req.max_completion_tokens or req.max_tokens
        if limit is not None and limit > room:
            return _error(400, f"max_tokens={limit} with a {len(ids)}-token prompt exceeds the model's "
                               f"{runtime.max_seq_len} tokens", code="context_length_exceeded", param="max_tokens")
        _, temperature, top_k, top_p = runtime._defaults(limit or room, req.temperature, req.top_k, req.top_p)
        try:
            check_sampling(temperature, top_k, top_p)
        except GlmcError as e:
            return _error(400, str(e))
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        return Job(ids, limit or room, temperature, top_p, top_k, req.seed, frozenset(stop_ids), tuple(s for s in stop if s),
                   sink=(loop, queue), quiet=not req.stream, adapter_slot=slot)

    async def _run(request: Request, req: _Common, ids: list[int], stop_ids: set, chat: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        job = _job(req, ids, stop_ids, queue, loop)
        if not isinstance(job, Job):
            return job
        try:
            engine.submit(job)
        except QueueFull:
            return _error(429, "the server is busy: too many requests waiting; retry later", kind="rate_limit_error",
                          code="queue_full")
        except GlmcError as e:
            return _error(503, str(e), kind="server_error")
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        answered_as = req.model if job.adapter_slot else model_name
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def usage():
            return {"prompt_tokens": len(ids), "completion_tokens": len(job.made),
                    "total_tokens": len(ids) + len(job.made)}

        def chunk(text, finish=None, first=False):
            if chat:
                delta = ({"role": "assistant", "content": text} if first else {"content": text}) if finish is None else {}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created, "model": answered_as,
                    "choices": [choice]}

        if req.stream:
            async def events():
                first, opening = True, runtime.codec.opening_filter() if chat else (lambda text: text)
                try:
                    while True:
                        ev = await queue.get()
                        if ev[0] == "token":
                            text = opening(ev[2])
                            if text or first:
                                yield f"data: {json.dumps(chunk(text, first=first), ensure_ascii=False)}\n\n"
                                first = False
                            continue
                        if ev[1] == "error":
                            err = {"error": {"message": ev[2], "type": "server_error", "param": None, "code": None}}
                            yield f"data: {json.dumps(err)}\n\n"
                            return
                        last = chunk("", finish=ev[1])
                        if (req.stream_options or {}).get("include_usage"):
                            last["usage"] = usage()
                        yield f"data: {json.dumps(last)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                finally:
                    engine.cancel(job)          # a client gone mid-stream frees its row

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            ev = await queue.get()              # quiet: the one event is "done"
        finally:
            engine.cancel(job)
        if ev[1] == "error":
            return _error(500, ev[2], kind="server_error")
        finish, text = ev[1], runtime.codec.reply(job.shown) if chat else job.shown
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                      "logprobs": None}
        else:
            prefix = runtime.decode_text(ids) if getattr(req, "echo", False) and runtime.codec else ""
            choice = {"index": 0, "text": prefix + text, "finish_reason": finish, "logprobs": None}
        return {"id": rid, "object": kind, "created": created, "model": answered_as, "choices": [choice],
                "usage": usage()}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, req: ChatRequest):
        if runtime.codec is None:
            return _error(400, "this model has no tokenizer, so it cannot chat")
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        try:
            ids = runtime.chat_ids(messages)
        except GlmcError as e:
            return _error(400, str(e), param="messages")
        return await _run(request, req, ids, runtime.eos_ids | runtime.codec.stop_ids(), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest):
        if isinstance(req.prompt, str):
            if runtime.codec is None:
                return _error(400, "this model has no tokenizer: send the prompt as a list of token ids")
            if not req.prompt:
                return _error(400, "the prompt is empty", param="prompt")
            ids = runtime.encode(req.prompt)
        else:
            ids = list(req.prompt)
            bad = [t for t in ids if not 0 <= t < runtime.vocab_size]
            if not ids or bad:
                return _error(400, f"prompt token ids must be a non-empty list in [0, {runtime.vocab_size})",
                              param="prompt")
        if req.max_tokens is None and req.max_completion_tokens is None:
            req.max_tokens = min(16, max(1, runtime.max_seq_len - len(ids)))       # the OpenAI default
        return await _run(request, req, ids, set(runtime.eos_ids), chat=False)

    return app


def serve(artifact, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_queue: int = 64,
          api_key: str | None = None, threads: int | None = None, announce: Callable[[str], object] | None = None,
          adapters: Sequence[tuple[str, str]] = ()) -> None:
    """Load ARTIFACT (and run-time adapters: (name, directory) pairs, requested as the
    "model") and serve it until SIGINT/SIGTERM; `announce` gets one line once the model is loaded."""
    import contextlib
    from pathlib import Path

    import uvicorn

    from glmc.runtime import load

    runtime = load(artifact, threads=threads)
    name = Path(artifact).name.removesuffix(".glmc")
    for adapter, path in adapters:
        if adapter == name:
            raise GlmcError(f"--adapter {adapter}: the name is the base model's; choose another")
        runtime.add_adapter(adapter, path)
    engine = Engine(runtime, max_batch=max_batch, max_queue=max_queue)
    app = make_app(runtime, engine, name, api_key)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        engine.stop()           # after uvicorn has finished the in-flight requests

    app.router.lifespan_context = lifespan
    mode = f"continuous batching, {engine.max_batch} rows" if engine.batched else "one request at a time"
    if runtime.adapters:
        mode += f", adapters {', '.join(runtime.adapters)}"
    if announce is not None:
        announce(f"glmc serve: {artifact} on http://{host}:{port}/v1 ({mode}, queue {max_queue})")
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)

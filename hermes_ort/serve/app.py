"""The OpenAI wire of `hermes serve`: /v1/models, /v1/completions, /v1/chat/completions (streamed as SSE
or not), /tokenize and /detokenize (vLLM's shapes), /health, /metrics; errors as OpenAI's error JSON. Requests become scheduler.Request objects; the engine
thread's pieces come back through an asyncio queue."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from ..errors import InputError
from ..generation.sampling import Sampling
from .logprobs import LogprobWire
from .scheduler import QueueFull, Request, Scheduler

RETRY_AFTER_S = 1
PING_S = 2.0  # an SSE comment after this long without a token: proxies and clients see the stream alive


@dataclass(frozen=True)
class ServerConfig:
    model: str  # the id /v1/models lists (the model directory's name)
    root: str  # the model directory
    api_key: str | None = None


def error(status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status,
                        headers=headers)


def sampling_of(body: dict) -> Sampling:
    """OpenAI's fields (temperature 0: greedy) and the extra top_k, repetition_penalty."""
    temperature = float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0)
    seed = body.get("seed")
    return Sampling(do_sample=temperature > 0, temperature=temperature if temperature > 0 else 1.0,
                    top_k=int(body.get("top_k") or 0), top_p=float(body.get("top_p") or 1.0),
                    min_p=float(body.get("min_p") or 0.0),
                    repetition_penalty=float(body.get("repetition_penalty") or 1.0),
                    seed=None if seed is None else int(seed))


def stops_of(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise InputError("stop must be a string or a list of strings")


def build_app(scheduler: Scheduler, config: ServerConfig) -> Starlette:
    tokenizer = scheduler.tokenizer

    def guarded(handler):
        """The handler behind the API key (when one is set): 401 in OpenAI's error JSON otherwise."""
        async def checked(request: HTTPRequest, **options):
            if config.api_key is not None and request.headers.get("authorization") != f"Bearer {config.api_key}":
                return error(401, "invalid or missing API key", "authentication_error")
            return await handler(request, **options)
        return checked

    async def health(request: HTTPRequest):
        if scheduler.failed is not None:
            return error(503, f"the engine failed: {scheduler.failed}", "server_error")
        if scheduler.draining:
            return error(503, "shutting down", "server_error")
        return JSONResponse({"status": "ok"}) if scheduler.ready.is_set() else error(503, "warming up", "server_error")

    @guarded
    async def models(request: HTTPRequest):
        return JSONResponse({"object": "list", "data": [
            {"id": config.model, "object": "model", "created": 0, "owned_by": "hermes-ort", "root": config.root,
             "max_model_len": scheduler.context}]})

    @guarded
    async def completion(request: HTTPRequest, chat: bool):
        if scheduler.draining:
            return error(503, "the server is shutting down", "server_error")
        try:
            body = await request.json()
            job = job_of(body, chat, scheduler, config.root)
        except (InputError, ValueError, TypeError) as e:
            return error(400, str(e))
        prompt, wire = job.prompt, LogprobWire(tokenizer, chat)
        loop, pieces = asyncio.get_running_loop(), asyncio.Queue()
        job.emit = lambda kind, value: loop.call_soon_threadsafe(pieces.put_nowait, (kind, value))
        try:
            scheduler.submit(job)
        except InputError as e:
            return error(400, str(e))
        except QueueFull as e:
            return error(503, f"the server is busy: {e}", "server_error", {"Retry-After": str(RETRY_AFTER_S)})
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(sse(job, pieces, ident, chat, usage, len(prompt), config.model, wire),
                                     media_type="text/event-stream")
        return await whole(request, job, pieces, ident, chat, len(prompt), config.model, wire)

    @guarded
    async def metrics(request: HTTPRequest):
        lines = [f"hermes_{name} {value}" for name, value in scheduler.metrics().items()]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @guarded
    async def tokenize(request: HTTPRequest):
        """vLLM's shape: {"prompt": text} -> {"tokens", "count", "max_model_len"}."""
        body = await request.json()
        if tokenizer is None or not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            return error(400, "tokenize takes {\"prompt\": text}" + ("" if tokenizer else
                                                                      f"; {config.root} has no tokenizer.json"))
        ids = tokenizer.encode_prompt(body["prompt"])
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": scheduler.context})

    @guarded
    async def detokenize(request: HTTPRequest):
        body = await request.json()
        tokens = body.get("tokens") if isinstance(body, dict) else None
        vocab = scheduler.layout.vocab or 1 << 62
        if tokenizer is None or not isinstance(tokens, list) or not all(
                isinstance(t, int) and 0 <= t < vocab for t in tokens):
            return error(400, f"detokenize takes {{\"tokens\": ids in [0, {vocab})}}" + (
                "" if tokenizer else f"; {config.root} has no tokenizer.json"))
        return JSONResponse({"prompt": tokenizer.decode(tokens, skip_special_tokens=False)})

    async def chat_route(request: HTTPRequest):
        return await completion(request, chat=True)

    async def text_route(request: HTTPRequest):
        return await completion(request, chat=False)

    return Starlette(routes=[Route("/health", health), Route("/metrics", metrics), Route("/v1/models", models),
                             Route("/tokenize", tokenize, methods=["POST"]),
                             Route("/detokenize", detokenize, methods=["POST"]),
                             Route("/v1/chat/completions", chat_route, methods=["POST"]),
                             Route("/v1/completions", text_route, methods=["POST"])])


def job_of(body, chat: bool, scheduler: Scheduler, root: str) -> Request:
    """A request body as the engine's Request (its emit set by the caller); InputError names what is wrong."""
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object")
    prompt = prompt_ids(body, chat, scheduler, root)
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = int(limit) if limit is not None else scheduler.context - len(prompt)
    if max_tokens < 1:
        raise InputError(f"max_tokens must be at least 1, got {max_tokens}")
    return Request(prompt, max_tokens, sampling_of(body), stops_of(body), emit=lambda kind, value: None,
                   logprobs=logprobs_of(body, chat))


def logprobs_of(body: dict, chat: bool) -> int | None:
    """How many rivals each token's logprobs entry lists (None: no logprobs): chat takes `logprobs: true`
    and `top_logprobs` 0-20, text completions `logprobs` 0-5, as OpenAI does."""
    if chat:
        top = body.get("top_logprobs")
        if top is not None and not body.get("logprobs"):
            raise InputError("top_logprobs needs logprobs: true")
        wanted, most = (int(top or 0) if body.get("logprobs") else None), 20
    else:
        wanted, most = (None if body.get("logprobs") is None else int(body["logprobs"])), 5
    if wanted is not None and not 0 <= wanted <= most:
        raise InputError(f"{'top_logprobs' if chat else 'logprobs'} must be in [0, {most}], got {wanted}")
    return wanted


def prompt_ids(body: dict, chat: bool, scheduler: Scheduler, root: str) -> list[int]:
    """A completion's prompt as token ids: text through the tokenizer (chat: its template) or ids as given."""
    tokenizer = scheduler.tokenizer
    raw = body.get("prompt")
    if not chat and isinstance(raw, list) and raw and all(isinstance(t, int) and not isinstance(t, bool)
                                                          for t in raw):
        vocab = scheduler.layout.vocab
        if vocab and not all(0 <= t < vocab for t in raw):
            raise InputError(f"prompt token ids must lie in [0, {vocab})")
        return list(raw)  # OpenAI's token-id prompt
    if tokenizer is None:
        raise InputError(f"{root} has no tokenizer.json: send the prompt as a list of token ids")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise InputError("messages must be a non-empty list of {role, content} objects")
        text = tokenizer.apply_chat_template([{"role": m.get("role", "user"), "content": m["content"]}
                                              for m in messages])
    else:
        text = body.get("prompt")
        if not isinstance(text, str) or not text:
            raise InputError("prompt must be a non-empty string or a list of token ids")
    ids = tokenizer.encode_prompt(text)
    if not ids:
        raise InputError("the prompt encodes to no tokens")
    return ids


async def whole(request: HTTPRequest, job: Request, pieces: asyncio.Queue, ident: str, chat: bool, prompt: int,
                model: str, wire: LogprobWire):
    """The non-streamed reply, once the engine thread has finished the request."""
    text, finish, entries = [], None, []
    try:
        while finish is None:
            try:
                kind, value = await asyncio.wait_for(pieces.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return JSONResponse({})
                continue
            if kind == "error":
                return error(500, str(value), "server_error")
            if kind == "text":
                text.append(value)
            elif kind == "logprob":
                entries.append(value)
            else:
                finish = value
    finally:
        job.cancelled.set()  # no-op once finished: the row left the batch already
    content = "".join(text)
    logprobs = None if job.logprobs is None else wire(entries)
    choice = ({"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish,
               "logprobs": logprobs} if chat else
              {"index": 0, "text": content, "finish_reason": finish, "logprobs": logprobs})
    return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                         "created": int(time.time()), "model": model, "choices": [choice],
                         "usage": usage_of(prompt, job.completion_tokens)})


async def sse(job: Request, pieces: asyncio.Queue, ident: str, chat: bool, usage: bool, prompt: int, model: str,
              wire: LogprobWire, ping_s: float = PING_S):
    """The streamed reply: OpenAI's chunks as the engine thread's pieces arrive, then [DONE]; a `: ping`
    comment whenever ping_s pass without one (a board can take seconds per token)."""
    kind_name = "chat.completion.chunk" if chat else "text_completion"
    created, started, entries = int(time.time()), False, []

    def chunk(delta_or_text, finish=None, choices=True, carries=True) -> str:
        """carries: the chunk takes the logprobs of the tokens since the last one (not the role chunk)."""
        logprobs = None if job.logprobs is None or not entries or not carries else wire(entries)
        if carries:
            entries.clear()
        choice = ({"index": 0, "delta": delta_or_text, "finish_reason": finish, "logprobs": logprobs} if chat else
                  {"index": 0, "text": delta_or_text, "finish_reason": finish, "logprobs": logprobs})
        return "data: " + json.dumps({"id": ident, "object": kind_name, "created": created,
                                      "model": model, "choices": [choice] if choices else []}) + "\n\n"

    try:
        while True:
            try:
                kind, value = await asyncio.wait_for(pieces.get(), timeout=ping_s)
            except asyncio.TimeoutError:
                yield ": ping\n\n"
                continue
            if kind == "logprob":
                entries.append(value)
                continue
            if kind == "error":
                yield "data: " + json.dumps({"error": {"message": str(value), "type": "server_error"}}) + "\n\n"
                break
            if kind == "text":
                if chat and not started:  # the role chunk, once a token exists
                    yield chunk({"role": "assistant", "content": ""}, carries=False)
                started = True
                yield chunk({"content": value} if chat else value)
                continue
            if chat and not started:
                yield chunk({"role": "assistant", "content": ""}, carries=False)
            yield chunk({} if chat else "", finish=value)
            if usage:
                payload = json.loads(chunk({} if chat else "")[len("data: "):])
                payload["choices"], payload["usage"] = [], usage_of(prompt, job.completion_tokens)
                yield "data: " + json.dumps(payload) + "\n\n"
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a client gone mid-stream: its row leaves the batch at the next pass


def usage_of(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

"""A minimal OpenAI-compatible chat endpoint around one local Hugging Face chat model.

The LLM-judge annotator (rlhf_core/llm_judge.py) speaks the OpenAI chat API so that it works
against vLLM, llama.cpp's server or a hosted API alike; this server gives alignflow the same
endpoint for any local model (`alignflow judge serve --model PATH`), and lets the judge's tests
run over real HTTP. Only what a judge needs: `POST /v1/chat/completions` (no streaming, one
choice) and `GET /v1/models`. There is no authentication, so `serve` binds to loopback by default.
"""
# No `from __future__ import annotations`: FastAPI resolves the route signatures at run time.
import threading
import time
import uuid
from pathlib import Path
from typing import Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from labeling.app import BodyLimit

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8766
DEFAULT_MAX_NEW_TOKENS = 512
# A judge request is a rubric, a prompt and an answer: tens of kB at a model's whole context. A
# body is parsed in full before validation, so a limit keeps one client from filling the memory.
MAX_BODY_BYTES = 1024 * 1024


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    # Unknown fields (top_p, user, ...) are ignored as OpenAI-compatible servers commonly do; the two
    # that change the response's shape are pinned so a client asking for them fails loudly instead.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(description="Must be the served model's id (GET /v1/models).")
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="0 = greedy decoding.")
    max_tokens: int | None = Field(None, ge=1, description="At most the server's max_new_tokens (its default).")
    seed: int | None = Field(None, description="Seeds sampling, so a temperature > 0 reply can be reproduced.")
    stream: Literal[False] = Field(False, description="Streaming is not supported.")
    n: Literal[1] = Field(1, description="One choice per request.")


class _ClientError(Exception):
    """A request that is well-formed but cannot be served (unknown model, too long, bad template)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def _error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error body, so OpenAI clients surface the message instead of a parse failure."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(_error_body(status, message, param, code), status_code=status)


def create_app(model_path: str | Path, device: str = "cpu", max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
               model_name: str | None = None) -> FastAPI:
    """An app serving the chat model in `model_path` (an HF folder or hub id) under `model_name`
    (default: the folder's name). The model is loaded once, here, so a bad path fails at start-up."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    name = model_name or Path(str(model_path)).name
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device).eval()
    except OSError as e:  # transformers' message for a missing folder talks about the hub; say what was asked
        raise OSError(f"cannot load the judge model from {str(model_path)!r}: {e}") from e
    if not tokenizer.chat_template:
        raise ValueError(f"{model_path}: the tokenizer has no chat template; the judge server needs a chat "
                         "(instruct) model")
    # Chat models may end a turn with a token other than the tokenizer's EOS (Llama 3's <|eot_id|>).
    configured = model.generation_config.eos_token_id
    stop_ids = sorted({tokenizer.eos_token_id, *(configured if isinstance(configured, list) else [configured])}
                      - {None})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    context = getattr(model.config, "max_position_embeddings", None)
    created = int(time.time())
    # One model instance: generate is not re-entrant with a shared global RNG, and two concurrent
    # generations would only halve each other's speed on CPU. Requests are served one at a time.
    lock = threading.Lock()

    # No /docs or /redoc: they load Swagger UI from a CDN, which offline machines cannot reach.
    app = FastAPI(title="alignflow judge server", version="1", docs_url=None, redoc_url=None,
                  description=f"OpenAI-compatible chat completions for {name}.")
    app.add_middleware(BodyLimit, limit=MAX_BODY_BYTES, reply=lambda n: _error_body(
        413, f"the request body is over {n} bytes", code="request_too_large"))

    @app.exception_handler(RequestValidationError)
    def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        problems, params = [], []
        for err in e.errors():
            if err.get("type") == "json_invalid":
                problems.append(f"the request body is not valid JSON ({err.get('ctx', {}).get('error', '')})")
                continue
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
            params.append(where)
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
        return _error(422, "; ".join(problems), param=params[0] if params else None)

    @app.exception_handler(StarletteHTTPException)
    def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(_ClientError)
    def _client(_: Request, e: _ClientError) -> JSONResponse:
        return _error(e.status, str(e), e.param, e.code)

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "alignflow"}]}

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest) -> dict:
        # A sync route runs in the thread pool, so the lock queues requests without blocking the event loop.
        if req.model != name:
            # Strict, unlike some local servers: the client records the model name as the annotator,
            # so a label must never be attributed to a model that did not give it.
            asked = req.model if len(req.model) <= 80 else req.model[:80] + "…"   # not the whole input back
            raise _ClientError(404, f"model {asked!r} is not served here; this server serves {name!r}",
                               "model", "model_not_found")
        limit = req.max_tokens or max_new_tokens
        if limit > max_new_tokens:
            raise _ClientError(422, f"max_tokens {limit} exceeds this server's limit of {max_new_tokens} "
                               "(start it with a larger --max-new-tokens)", "max_tokens")
        try:
            text = tokenizer.apply_chat_template([m.model_dump() for m in req.messages], tokenize=False,
                                                 add_generation_prompt=True)
        except TemplateError as e:  # e.g. a template that rejects a system message
            raise _ClientError(422, f"the model's chat template rejected the messages: {e}", "messages") from e
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        n_prompt = ids.shape[1]
        if context is not None and n_prompt + limit > context:
            raise _ClientError(422, f"prompt ({n_prompt} tokens) + max_tokens ({limit}) exceeds the model's "
                               f"context of {context} tokens", "messages", "context_length_exceeded")
        greedy = req.temperature == 0
        sampling = {} if greedy else {"temperature": req.temperature, "top_p": 1.0, "top_k": 0}
        with lock, torch.inference_mode():
            if req.seed is not None:
                torch.manual_seed(req.seed)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=not greedy,
                                 max_new_tokens=limit, pad_token_id=pad_id, eos_token_id=stop_ids, **sampling)
        new = out[0, n_prompt:].tolist()
        end = next((i for i, t in enumerate(new) if t in stop_ids), None)
        stopped = end is not None
        if stopped:
            new = new[:end]
        content = tokenizer.decode(new, skip_special_tokens=True).strip()
        n_completion = len(new) + int(stopped)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop" if stopped else "length"}],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_completion,
                      "total_tokens": n_prompt + n_completion},
        }

    return app


def serve(model_path: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, device: str = "cpu",
          max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, model_name: str | None = None) -> None:
    """Serve the model until interrupted (`alignflow judge serve --model PATH`)."""
    import uvicorn

    app = create_app(model_path, device=device, max_new_tokens=max_new_tokens, model_name=model_name)
    uvicorn.run(app, host=host, port=port, log_level="info")

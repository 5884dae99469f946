"""
Serve a trained model over HTTP: an OpenAI-compatible API and a chat page.

    python serve.py --model_name chat_tiny                  # http://127.0.0.1:8000 (the page), /v1/... (the API)
    python serve.py --model_name chat_tiny --port 0 --api_key secret --max_batch_size 16

Endpoints: GET /v1/models, POST /v1/chat/completions (models trained on chat data), POST /v1/completions (a
plain-text prompt), GET /health, GET / (the chat page). Responses, streamed chunks (server-sent events), errors
and usage are in OpenAI's shapes, so any OpenAI client or chat front end works with base_url http://HOST:PORT/v1.

Concurrent requests decode together: one background thread owns the model and runs engine.py's batch, and a
request that arrives while others generate joins the batch at the next step. The HTTP side (FastAPI on uvicorn)
only parses, hands requests to that thread through a queue and streams back what it reports. Greedy replies
(temperature 0) are sample.py's for the same model and --dtype: the same chat template, BOS and stop rules.
On the CPU the weights are laid out for decoding (decode_weights.py): fp32 packed for the batch size, or
--dtype int8 (weight-only int8: 1.6x fp32 for one stream, bench.py).
"""

import argparse
import asyncio
import html
import json
import math
import os
import queue
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from checkpoint import CheckpointError, latest_model_name, load_model
from decode_weights import for_decoding
from engine import Engine, Request
from errors import InputError, one_line_errors
from runtime import add_model_arguments, autocast_context, keep_freed_memory, pick_device, pick_dtype
from tokenizer import TURN_STOPS, chat_prompt, content_text

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve_page.html")
# OpenAI's roles -> the chat template's ("developer" is OpenAI's newer name for the system prompt)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    p.add_argument("--port", type=int, default=8000, help="0: any free port (the URL printed says which)")
    p.add_argument("--max_batch_size", type=int, default=8, help="requests decoded together; more wait their turn")
    p.add_argument("--api_key", default=None, help="if set, every /v1 request needs 'Authorization: Bearer KEY'")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# the decode thread: the only code that touches the model

class DecodeLoop:
    """One thread that owns the engine. Request handlers put (request, deliver) into `inbox`; the thread adds them to
    the batch between steps and calls deliver(text, finish_reason, error) for each event. A step that raises fails
    the requests in it (error reported, rows dropped) and the loop goes on serving."""

    def __init__(self, engine):
        self.engine = engine
        self.inbox = queue.Queue()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="decode", daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        """Finish: every open request is told the server is shutting down. Safe from a signal handler."""
        self.stopping.set()

    def submit(self, req, deliver):
        req.deliver = deliver
        self.inbox.put(req)

    def _take(self, block):
        """Move what the handlers submitted into the engine (waiting a little for work when idle)."""
        items = []
        try:
            items.append(self.inbox.get(timeout=0.1) if block else self.inbox.get_nowait())
            while True:
                items.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        for req in items:
            try:
                self.engine.submit(req)
            except Exception as e:  # noqa: BLE001 -- checked by the handlers already; one must never stop the loop
                self._tell(req, "", "error", str(e))

    @staticmethod
    def _tell(req, text, finish, error=None):
        try:
            req.deliver(text, finish, error)
        except RuntimeError:  # the event loop is closed (shutting down): nobody is listening
            pass

    def _run(self):
        while not self.stopping.is_set():
            self._take(block=not self.engine.busy)
            if not self.engine.busy:
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # noqa: BLE001 -- report it to the requests in the batch, keep serving
                traceback.print_exc()
                for req in self.engine.clear():
                    why = str(e).splitlines()[0][:200] if str(e) else ""
                    self._tell(req, "", "error", f"generation failed: {type(e).__name__}: {why}")
                continue
            for req, text, finish in events:
                self._tell(req, text, finish)
        self._take(block=False)
        for req in self.engine.clear():
            self._tell(req, "", "error", "the server is shutting down")


class Sink:
    """Where the decode thread's events for one request land, on the HTTP side's event loop."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.items = []
        self.ready = asyncio.Event()

    def deliver(self, text, finish, error=None):  # called on the decode thread
        self.loop.call_soon_threadsafe(self._push, (text, finish, error))

    def _push(self, item):
        self.items.append(item)
        self.ready.set()

    async def take(self, timeout=None):
        """The events so far (waits for at least one; [] after `timeout` seconds)."""
        if not self.items:
            try:
                await asyncio.wait_for(self.ready.wait(), timeout)
            except TimeoutError:
                return []
        items, self.items = self.items, []
        self.ready.clear()
        return items


# ---------------------------------------------------------------------------------------------------------------
# request checking: every bad input is a 4xx in OpenAI's error shape, naming the field

class APIError(Exception):
    def __init__(self, status, message, param=None, code=None, type="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message, param=None, code=None):
    return APIError(400, message, param, code)


def number(body, key, default, low=None, high=None, low_open=False, integer=False):
    """body[key] as a number (absent or null: default), checked against [low, high] (low_open: (low, high])."""
    v = body.get(key)
    if v is None:
        return default
    kind = "an integer" if integer else "a number"
    not_finite = isinstance(v, float) and not math.isfinite(v)  # json.loads reads NaN and Infinity
    if isinstance(v, bool) or not isinstance(v, int if integer else (int, float)) or not_finite:
        raise bad(f"'{key}' must be {kind}, got {json.dumps(v)[:40]}", key, "invalid_type")
    if (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high):
        span = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}]"
        raise bad(f"'{key}' must lie in {span}, got {v}", key, "invalid_value")
    return v


def flag(body, key, default=False):
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{key}' must be true or false, got {json.dumps(v)[:40]}", key, "invalid_type")
    return v


def stop_strings(body):
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v) or len(v) > 4:
        raise bad("'stop' must be a string or a list of at most 4 strings", "stop", "invalid_type")
    return tuple(s for s in v if s)


def unsupported(body):
    """Fields whose non-default values this server cannot honour: refused rather than silently ignored."""
    if body.get("n") not in (None, 1):
        raise bad("'n' must be 1: this server returns one choice per request (send several requests)", "n")
    for key in ("logprobs", "echo"):
        if body.get(key) not in (None, False, 0):
            raise bad(f"'{key}' is not supported by this server", key)
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise bad(f"'{key}' is not supported by this server (only 0)", key)
    if body.get("suffix") not in (None, ""):
        raise bad("'suffix' is not supported by this server", "suffix")


def message_text(m, i):
    """A message's content read as training records are (tokenizer.content_text); null only for an assistant."""
    c = m.get("content")
    text = content_text(c) if c is not None or m["role"] == "assistant" else None
    if text is not None:
        return text
    raise bad(f"messages[{i}].content must be a string or a list of {{\"type\": \"text\", \"text\": ...}} parts",
              f"messages[{i}].content", "invalid_type")


def chat_turns(body):
    msgs = body.get("messages")
    if msgs is None:
        raise bad("'messages' is required: a list of {\"role\", \"content\"} objects", "messages",
                  "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages", "invalid_type")
    turns = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object with 'role' and 'content'", f"messages[{i}]", "invalid_type")
        if m.get("role") not in ROLES:
            raise bad(f"messages[{i}].role {json.dumps(m.get('role'))[:40]} is not one of {', '.join(ROLES)}",
                      f"messages[{i}].role", "invalid_value")
        turns.append((ROLES[m["role"]], message_text(m, i)))
    return turns


class Service:
    """The loaded model and what the HTTP handlers need of it: checking a request and turning it into engine work."""

    def __init__(self, name, model, tok, ckpt, created, api_key=None):
        self.name, self.tok, self.api_key = name, tok, api_key
        self.block_size = model.config.block_size
        self.is_chat = ckpt.get("data_format") == "chat"
        self.created = created

    def card(self):
        return {"id": self.name, "object": "model", "created": self.created, "owned_by": "gptlab",
                "chat": self.is_chat, "context_length": self.block_size}

    def check_key(self, request):
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if not auth:
            raise APIError(401, "Missing API key: send the header 'Authorization: Bearer <key>' (the server was "
                                "started with --api_key)", code="missing_api_key")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect API key provided", code="invalid_api_key")

    def check_model(self, body):
        m = body.get("model")
        if m is not None and m != self.name:
            raise APIError(404, f"The model {json.dumps(m)[:80]} does not exist: this server serves '{self.name}' "
                                f"(GET /v1/models)", "model", "model_not_found")

    def encode(self, make_ids, param):
        try:
            ids = make_ids()
        except ValueError as e:  # a character the char vocabulary lacks
            raise bad(f"{param}: {e}", param, "invalid_value") from None
        if len(ids) >= self.block_size:
            raise bad(f"This model's maximum context length is {self.block_size} tokens, and the prompt is "
                      f"{len(ids)} tokens (at most {self.block_size - 1}, to leave room for a reply)", param,
                      "context_length_exceeded")
        return ids

    def request(self, body, chat):
        """A checked engine Request for a chat or completions body."""
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        self.check_model(body)
        unsupported(body)
        if chat:
            if not self.is_chat:
                raise bad(f"model '{self.name}' was trained on plain text, not chat data, so it has no chat template: "
                          "use /v1/completions with a plain-text prompt", "messages", "model_not_chat")
            turns = chat_turns(body)
            ids = self.encode(lambda: chat_prompt(self.tok, turns), "messages")
            newer = number(body, "max_completion_tokens", None, 1, integer=True)  # OpenAI's newer name wins
            limit = number(body, "max_tokens", None, 1, integer=True) if newer is None else newer
            default_limit, stop = self.block_size - len(ids), stop_strings(body) + TURN_STOPS
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise bad("'prompt' is required: a string", "prompt",
                          "missing_required_parameter" if prompt is None else "invalid_type")
            ids = self.encode(lambda: [self.tok.eot_token] + self.tok.encode(prompt), "prompt")  # BOS first
            limit = number(body, "max_tokens", None, 1, integer=True)
            default_limit, stop = 16, stop_strings(body)  # OpenAI's default for completions
        return Request(ids, limit or default_limit, temperature=number(body, "temperature", 1.0, 0, 2),
                       top_p=number(body, "top_p", 1.0, 0, 1, low_open=True),
                       top_k=number(body, "top_k", None, 0, integer=True) or None,
                       seed=number(body, "seed", None, -2 ** 63, 2 ** 64 - 1, integer=True),
                       stop_tokens=(self.tok.eot_token,), stop=stop)


# ---------------------------------------------------------------------------------------------------------------
# responses in OpenAI's shapes

def usage(req):
    return {"prompt_tokens": len(req.ids), "completion_tokens": len(req.tokens),
            "total_tokens": len(req.ids) + len(req.tokens)}


def choice(chat, text, finish, delta=False):
    if not chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    key = "delta" if delta else "message"
    body = ({"content": text} if text or not finish else {}) if delta else {"role": "assistant", "content": text}
    return {"index": 0, key: body, "logprobs": None, "finish_reason": finish}


def envelope(chat, rid, created, name, chunk=False):
    kind = ("chat.completion" if chat else "text_completion") + (".chunk" if chunk and chat else "")
    return {"id": rid, "object": kind, "created": created, "model": name}


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------------------------
# the HTTP side: handlers read the Service and the DecodeLoop from app.state

def error_response(e):
    return JSONResponse(e.body(), status_code=e.status)


async def on_api_error(request, e):
    return error_response(e)


async def on_http_error(request, e):  # unknown paths (404), wrong methods (405)
    msg = {404: f"Unknown path {request.url.path}: see GET /v1/models, POST /v1/chat/completions, "
                f"POST /v1/completions, GET /health", 405: f"Method {request.method} not allowed on {request.url.path}"}
    return error_response(APIError(e.status_code, msg.get(e.status_code, str(e.detail))))


async def on_validation_error(request, e):
    return error_response(bad(f"invalid request: {str(e)[:200]}"))


async def on_crash(request, e):
    traceback.print_exception(e)
    return error_response(APIError(500, f"internal error: {type(e).__name__}", type="server_error"))


async def page(request: HTTPRequest):
    name = request.app.state.service.name
    with open(PAGE, encoding="utf-8") as f:
        text = f.read()
    # the name is a folder name, but any text must stay text: JSON in the script (with "</" escaped), HTML elsewhere
    return HTMLResponse(text.replace("__MODEL_JSON__", json.dumps(name).replace("</", "<\\/")).replace(
        "__MODEL_NAME__", html.escape(name)))


async def health(request: HTTPRequest):
    service, decode = request.app.state.service, request.app.state.decode
    return {"status": "ok", "model": service.name, "running": len(decode.engine.rows),
            "waiting": len(decode.engine.pending) + decode.inbox.qsize()}


async def models(request: HTTPRequest):
    service = request.app.state.service
    service.check_key(request)
    return {"object": "list", "data": [service.card()]}


async def one_model(name: str, request: HTTPRequest):
    service = request.app.state.service
    service.check_key(request)
    service.check_model({"model": name})
    return service.card()


async def chat_completions(request: HTTPRequest):
    return await complete(request, chat=True)


async def completions(request: HTTPRequest):
    return await complete(request, chat=False)


async def complete(request, chat):
    """Check the request, hand it to the decode thread, then stream or collect what comes back."""
    service, decode = request.app.state.service, request.app.state.decode
    service.check_key(request)
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({getattr(e, 'msg', e)} at line "
                  f"{getattr(e, 'lineno', 1)} column {getattr(e, 'colno', 1)})", code="invalid_json") from None
    req = service.request(body, chat)
    stream = flag(body, "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
    include_usage = flag(opts, "include_usage")
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    head = envelope(chat, rid, int(time.time()), service.name, chunk=stream)
    sink = Sink()
    decode.submit(req, sink.deliver)
    if stream:
        return StreamingResponse(stream_events(req, sink, chat, head, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await whole_reply(request, req, sink, chat, head)


async def whole_reply(request, req, sink, chat, head):
    text = []
    try:
        while True:
            for piece, finish, error in await sink.take(timeout=0.5):
                if error:
                    raise APIError(503 if "shutting down" in error else 500, error, type="server_error")
                text.append(piece)
                if finish:
                    return {**head, "choices": [choice(chat, "".join(text), finish)], "usage": usage(req)}
            if await request.is_disconnected():  # nobody waits for this reply any more
                return JSONResponse({}, status_code=499)
    finally:
        req.cancel()  # frees the row at the engine's next step; a no-op once finished


async def stream_events(req, sink, chat, head, include_usage):
    # a client that goes away cancels this generator (Starlette watches for the disconnect): `finally` frees the
    # row at the engine's next step
    try:
        if chat:
            yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        while True:
            for piece, finish, error in await sink.take():
                if error:
                    yield sse(APIError(500, error, type="server_error").body())
                    return
                if piece or finish:
                    yield sse({**head, "choices": [choice(chat, piece, finish, delta=True)]})
                if finish:
                    if include_usage:
                        yield sse({**head, "choices": [], "usage": usage(req)})
                    yield "data: [DONE]\n\n"
                    return
    finally:
        req.cancel()


def build_app(service, decode):
    @asynccontextmanager
    async def lifespan(app):
        decode.start()
        yield
        decode.stop()
        decode.thread.join(timeout=10)

    app = FastAPI(title="gptlab serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.decode = service, decode
    for exc, handler in ((APIError, on_api_error), (HTTPException, on_http_error),
                         (RequestValidationError, on_validation_error), (Exception, on_crash)):
        app.add_exception_handler(exc, handler)
    app.add_api_route("/", page, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{name}", one_model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    return app


# ---------------------------------------------------------------------------------------------------------------

def load(args):
    """(name, model, tokenizer, checkpoint, device, device type, dtype), loaded as sample.py loads them."""
    device = pick_device(args.device)
    name = args.model_name or latest_model_name(args.out_dir)
    if name is None:
        raise CheckpointError(f"no trained model in {args.out_dir}/: train one first, e.g. "
                              f"python train.py --config_file configs/tiny_sft.json")
    if args.max_batch_size < 1:
        raise InputError(f"--max_batch_size must be >= 1, got {args.max_batch_size}")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must lie in [0, 65535], got {args.port}")
    prefer = "best.pt" if args.checkpoint == "best" else "ckpt.pt"
    model, tok, ckpt = load_model(name, args.out_dir, device, prefer=prefer)
    device_type = "cuda" if device.startswith("cuda") else device
    folder = os.path.dirname(name) if name.endswith(".pt") else name
    name = os.path.basename(os.path.normpath(folder)) or name  # a folder or .pt path: the model is its folder
    return name, model, tok, ckpt, device, device_type, pick_dtype(args.dtype, device_type)


def listen(host, port):
    """A socket bound to host:port (port 0: any free one), made here so the URL printed is the real one."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:  # address in use, a host name that does not resolve, a port below 1024 without root
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror or e} (choose another --host or --port)") \
            from None
    return sock


@one_line_errors
def main(argv=None):
    args = parse_args(argv)
    name, model, tok, ckpt, device, device_type, dtype = load(args)
    sock = listen(args.host, args.port)
    if device_type == "cpu":
        keep_freed_memory()  # as sample.py does
    model = for_decoding(model, dtype, args.max_batch_size)  # fp32 packed or int8 weights (decode_weights.py)
    engine = Engine(model, tok, args.max_batch_size, autocast=lambda: autocast_context(device_type, dtype))
    decode = DecodeLoop(engine)
    service = Service(name, model, tok, ckpt, int(time.time()), args.api_key)
    app = build_app(service, decode)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # a clean stop with exit status 0: open requests are told, the decode thread ends, uvicorn closes the
            # connections; uvicorn's own handler would re-raise the signal afterwards (death by SIGTERM, or a
            # KeyboardInterrupt traceback). A second Ctrl-C forces the exit.
            print(f"\n[{signal.Signals(sig).name}: shutting down]", file=sys.stderr, flush=True)
            decode.stop()
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True

    server = Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    kind = "chat" if service.is_chat else "text (use /v1/completions)"
    print(f"serving '{name}' ({kind}, {model.get_num_params() / 1e6:.2f}M parameters, {device} {dtype}, "
          f"batch up to {args.max_batch_size}) at {url}  (chat page: {url}/  API: {url}/v1)", flush=True)
    sock.listen(128)
    server.run(sockets=[sock])
    print("[stopped]", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

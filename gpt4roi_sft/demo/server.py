"""The region-chat server: the page, a JSON API, and one generation queue in front of the model.

Endpoints (bodies are JSON; boxes are ``[x1, y1, x2, y2]`` pixels of the image as displayed, i.e. with
its EXIF orientation applied):

- ``GET /``: the page; ``GET /static/<file>``: its script, style sheet and example images;
  ``GET /api/info``: the server's limits and the bundled examples.
- ``POST /api/chat`` ``{"image": base64, "boxes": [...], "messages": [{"role", "content"}, ...],
  "max_new_tokens": N}`` -> ``{"answer": str}``. Users name boxes ``<region1>``, ``<region2>``, ... in
  their messages (:func:`gpt4roi_sft.infer.chat_request` maps them to GPT4RoI's ``regionk <bbox>``).
- ``POST /api/describe`` ``{"image": base64, "boxes": [...], "max_new_tokens": N}`` ->
  ``{"captions": [str, ...]}``, one per box in order, each asked with the VG region-captioning question.
- Either with ``"stream": true`` answers as server-sent events (``text/event-stream``), each ``data:`` line
  one JSON object: ``{"queued": k}`` (k requests ahead), ``{"started": true}``, ``{"delta": str}`` (chat)
  or ``{"region": i, "delta": str}`` / ``{"region": i, "caption": str}`` (describe), and finally
  ``{"done": true, "answer"|"captions": ...}`` or ``{"error": str}``.

Bad input (malformed JSON, an unknown field, not an image, a box outside the image, more boxes than
``max_regions``, ``<region3>`` with two boxes, a prompt that does not fit the model's context) is refused
with HTTP 400 and ``{"error": "<one line>"}`` before it is queued. A single thread owns the model and
runs requests one at a time in arrival order; page and API requests are served by other threads
meanwhile, and a streamed request whose client goes away stops decoding at the next token.
"""

from __future__ import annotations

import base64
import binascii
import copy
import io
import json
import logging
import queue
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Callable, List, Optional, Sequence, Tuple

from PIL import Image, ImageOps, UnidentifiedImageError

from gpt4roi_sft.constants import GPT4ROI_PREAMBLE, VG_EVAL_QUESTION
from gpt4roi_sft.data.image_transform import validate_boxes
from gpt4roi_sft.errors import DataError, UserError
from gpt4roi_sft.infer import RegionCaptioner, RegionRequest, chat_request

logger = logging.getLogger(__name__)

# "Describe" asks each box the VG region-captioning evaluation's question.
DESCRIBE_PROMPT = GPT4ROI_PREAMBLE + VG_EVAL_QUESTION

STATIC_FILES = {  # name -> content type; nothing else under static/ is served
    "index.html": "text/html; charset=utf-8",
    "demo.js": "text/javascript; charset=utf-8",
    "demo.css": "text/css; charset=utf-8",
    "examples.json": "application/json",
}
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg"}
# The page loads its own files only; the browser refuses anything else.
CONTENT_SECURITY_POLICY = "default-src 'self'; img-src 'self' data: blob:; connect-src 'self'; object-src 'none'"


class BusyError(Exception):
    """The generation queue is full."""


@dataclass
class DemoSettings:
    """Limits of one server.

    max_regions: most boxes per request (GPT4RoI's dialogues hold at most 15 regions);
    max_new_tokens: the default and the largest ``max_new_tokens`` a request may ask for;
    max_waiting: requests queued or running before new ones get HTTP 503;
    max_body_bytes / max_image_pixels: the largest request body and decoded image accepted.
    """

    max_regions: int = 15
    max_new_tokens: int = 256
    max_waiting: int = 16
    max_body_bytes: int = 32 * 2**20
    max_image_pixels: int = 50_000_000
    model_name: str = ""


class Job:
    """One queued request: ``work(captioner, job)`` runs on the model thread and reports through ``emit``.

    Events are dicts read by the HTTP thread from ``events``; the last one has ``done`` or ``error``.
    ``cancelled`` is set by the HTTP thread when its client went away.
    """

    def __init__(self, work: Callable[[RegionCaptioner, "Job"], None]):
        self.work = work
        self.events: "queue.Queue[dict]" = queue.Queue()
        self.cancelled = threading.Event()
        self.ahead = 0

    def emit(self, **event) -> None:
        self.events.put(event)


class GenerationQueue:
    """A thread that owns the captioner and runs :class:`Job` s one at a time, in arrival order."""

    def __init__(self, captioner: RegionCaptioner, max_waiting: int = 16):
        self.captioner = captioner
        self.max_waiting = max_waiting
        self._jobs: "queue.Queue[Job]" = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0  # queued + running
        self._thread = threading.Thread(target=self._run, name="region-chat-model", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[RegionCaptioner, Job], None]) -> Job:
        """Queue ``work``; ``job.ahead`` is how many requests run or wait before it. Raises :class:`BusyError`."""
        job = Job(work)
        with self._lock:
            if self._pending >= self.max_waiting:
                raise BusyError(f"the server is busy ({self._pending} requests queued or running); try again shortly")
            job.ahead = self._pending
            self._pending += 1
        self._jobs.put(job)
        return job

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if not job.cancelled.is_set():
                    job.emit(started=True)
                    job.work(self.captioner, job)
            except UserError as exc:
                job.emit(error=str(exc))
            except Exception as exc:  # the server keeps serving; the client gets one line
                logger.exception("generation failed")
                job.emit(error=f"generation failed: {type(exc).__name__}: {exc}".splitlines()[0])
            finally:
                with self._lock:
                    self._pending -= 1


def decode_image(data, max_pixels: int) -> Image.Image:
    """A base64 string (optionally a ``data:image/...;base64,`` URL) -> an RGB image, EXIF orientation applied."""
    if not isinstance(data, str) or not data:
        raise DataError("image: must be a base64-encoded JPEG or PNG string")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise DataError("image: not valid base64") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if im.width * im.height > max_pixels:
                raise DataError(f"image: {im.width}x{im.height} is larger than this server accepts ({max_pixels} pixels)")
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except DataError:
        raise
    except UnidentifiedImageError:
        raise DataError("image: not an image (expected a base64-encoded JPEG or PNG)") from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"image: cannot be decoded ({reason})") from None


def parse_boxes(value, width: int, height: int, max_regions: int) -> List[List[float]]:
    """Pixel xyxy boxes that lie inside the ``width`` x ``height`` image, at most ``max_regions`` of them."""
    if not isinstance(value, list) or not all(isinstance(b, list) for b in value):
        raise DataError("boxes: must be a list of [x1, y1, x2, y2] pixel boxes")
    if len(value) > max_regions:
        raise DataError(f"boxes: {len(value)} boxes; this model takes at most {max_regions} regions per request")
    for i, box in enumerate(value):
        if len(box) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
            raise DataError(f"boxes[{i}]: must be 4 numbers [x1, y1, x2, y2], got {json.dumps(box)[:80]}")
    validate_boxes(value, width, height, where="boxes", clip=True)  # finite, not empty, not wholly outside
    for i, (x1, y1, x2, y2) in enumerate(value):
        if x1 < 0 or y1 < 0 or x2 > width or y2 > height:  # clipping would silently change what was asked
            raise DataError(f"boxes[{i}]: {json.dumps(value[i])} is not inside the {width}x{height} image")
    return [[float(v) for v in box] for box in value]


def _max_new_tokens(payload: dict, limit: int) -> int:
    value = payload.get("max_new_tokens", limit)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
        raise DataError(f"max_new_tokens: must be an integer from 1 to {limit}, got {json.dumps(value)[:40]}")
    return value


def _check_fields(payload, allowed: Sequence[str], required: Sequence[str]) -> None:
    if not isinstance(payload, dict):
        raise DataError("the request body must be a JSON object")
    unknown = sorted(set(payload) - set(allowed))
    if unknown:
        raise DataError(f"unknown field {unknown[0]!r} (expected {', '.join(allowed)})")
    for name in required:
        if name not in payload:
            raise DataError(f"missing field {name!r}")


@dataclass
class ParsedRequest:
    """A checked request: what to generate, how many tokens, and whether to stream."""

    requests: List[RegionRequest]
    max_new_tokens: int
    stream: bool = False
    kind: str = "chat"


class DemoApp:
    """Request checking and generation around one :class:`RegionCaptioner` (what the HTTP handler calls)."""

    def __init__(self, captioner: RegionCaptioner, settings: Optional[DemoSettings] = None):
        self.captioner = captioner
        self.settings = settings or DemoSettings()
        self.queue = GenerationQueue(captioner, self.settings.max_waiting)
        # HTTP threads count prompt tokens with their own tokenizer copy; the model thread uses the original.
        self._tokenizer = copy.deepcopy(captioner.processor.tokenizer)
        self._tokenizer_lock = threading.Lock()
        config = getattr(captioner.model, "config", None)
        text_config = getattr(config, "text_config", None)
        self.context_length: Optional[int] = getattr(text_config, "max_position_embeddings", None)

    # ---- request checking (HTTP threads) ----

    def info(self) -> dict:
        return {
            "model": self.settings.model_name,
            "template": self.captioner.template,
            "max_regions": self.settings.max_regions,
            "max_new_tokens": self.settings.max_new_tokens,
            "context_length": self.context_length,
            "describe_prompt": DESCRIBE_PROMPT,
            "examples": load_examples(),
        }

    def _image_and_boxes(self, payload: dict) -> Tuple[Image.Image, List[List[float]]]:
        image = decode_image(payload["image"], self.settings.max_image_pixels)
        boxes = parse_boxes(payload.get("boxes", []), image.width, image.height, self.settings.max_regions)
        return image, boxes

    def _check_length(self, request: RegionRequest, max_new_tokens: int) -> None:
        if self.context_length is None:
            return
        with self._tokenizer_lock:
            n = self.captioner.prompt_length(request, tokenizer=self._tokenizer)
        if n + max_new_tokens > self.context_length:
            raise DataError(
                f"the prompt is {n} tokens (image included); with max_new_tokens {max_new_tokens} it exceeds the "
                f"model's {self.context_length}-token context (shorten the conversation or reset it)"
            )

    def parse_chat(self, payload) -> ParsedRequest:
        _check_fields(payload, ("image", "boxes", "messages", "max_new_tokens", "stream"), ("image", "messages"))
        max_new_tokens = _max_new_tokens(payload, self.settings.max_new_tokens)
        image, boxes = self._image_and_boxes(payload)
        request = chat_request(image, payload["messages"], boxes)
        self._check_length(request, max_new_tokens)
        return ParsedRequest([request], max_new_tokens, bool(payload.get("stream", False)), "chat")

    def parse_describe(self, payload) -> ParsedRequest:
        _check_fields(payload, ("image", "boxes", "max_new_tokens", "stream"), ("image", "boxes"))
        max_new_tokens = _max_new_tokens(payload, self.settings.max_new_tokens)
        image, boxes = self._image_and_boxes(payload)
        if not boxes:
            raise DataError("boxes: describe needs at least one box")
        requests = [RegionRequest(image, DESCRIBE_PROMPT, [box]) for box in boxes]
        self._check_length(requests[0], max_new_tokens)
        return ParsedRequest(requests, max_new_tokens, bool(payload.get("stream", False)), "describe")

    # ---- generation (model thread) ----

    def submit(self, parsed: ParsedRequest) -> Job:
        """Queue the generation for ``parsed``; its events end with ``done`` (or ``error``)."""
        if parsed.kind == "chat":
            return self.queue.submit(lambda captioner, job: _chat_work(captioner, job, parsed))
        if parsed.stream:
            return self.queue.submit(lambda captioner, job: _describe_stream_work(captioner, job, parsed))
        return self.queue.submit(lambda captioner, job: _describe_batch_work(captioner, job, parsed))


def _stream_one(captioner: RegionCaptioner, job: Job, request: RegionRequest, max_new_tokens: int, **tag) -> str:
    pieces = []
    stream = captioner.stream(request, cancel=job.cancelled, max_new_tokens=max_new_tokens)
    try:
        for piece in stream:
            pieces.append(piece)
            job.emit(delta=piece, **tag)
    finally:
        stream.close()
    return "".join(pieces)


def _chat_work(captioner: RegionCaptioner, job: Job, parsed: ParsedRequest) -> None:
    answer = _stream_one(captioner, job, parsed.requests[0], parsed.max_new_tokens)
    job.emit(done=True, answer=answer)


def _describe_stream_work(captioner: RegionCaptioner, job: Job, parsed: ParsedRequest) -> None:
    captions = []
    for i, request in enumerate(parsed.requests):
        if job.cancelled.is_set():
            return
        captions.append(_stream_one(captioner, job, request, parsed.max_new_tokens, region=i))
        job.emit(region=i, caption=captions[-1])
    job.emit(done=True, captions=captions)


def _describe_batch_work(captioner: RegionCaptioner, job: Job, parsed: ParsedRequest) -> None:
    captions = captioner(parsed.requests, max_new_tokens=parsed.max_new_tokens, **captioner.stop_kwargs())
    job.emit(done=True, captions=captions)


def load_examples() -> List[dict]:
    """The bundled examples (``static/examples.json``): ``[{"name", "file", "boxes"}]``."""
    return json.loads(_static_file("examples.json").decode("utf-8"))


def _static_file(name: str) -> bytes:
    return resources.files("gpt4roi_sft.demo").joinpath("static", *name.split("/")).read_bytes()


def _static_type(name: str) -> Optional[str]:
    if name in STATIC_FILES:
        return STATIC_FILES[name]
    head, _, file = name.partition("/")
    suffix = file[file.rfind("."):].lower() if "." in file else ""
    if head == "examples" and "/" not in file and suffix in IMAGE_TYPES and not file.startswith("."):
        return IMAGE_TYPES[suffix]
    return None


class DemoHandler(BaseHTTPRequestHandler):
    """Routes requests to the server's :class:`DemoApp` (``self.server.app``)."""

    server_version = "gpt4roi-demo"
    KEEPALIVE_S = 5.0  # a streamed response sends a comment this often while it waits, to notice a gone client

    @property
    def app(self) -> DemoApp:
        return self.server.app  # type: ignore[attr-defined]

    def log_message(self, fmt, *args):
        logger.info("%s %s", self.address_string(), fmt % args)

    # ---- responses ----

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": " ".join(str(message).split())})

    # ---- GET ----

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            return self._send(200, _static_file("index.html"), STATIC_FILES["index.html"])
        if path == "/api/info":
            return self._json(200, self.app.info())
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            content_type = _static_type(name)
            if content_type is not None:
                try:
                    return self._send(200, _static_file(name), content_type)
                except (FileNotFoundError, IsADirectoryError):
                    pass
        self._error(404, f"not found: {path}")

    # ---- POST ----

    def _read_json(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise DataError("the request needs a Content-Length header")
        if int(length) > self.app.settings.max_body_bytes:
            raise _TooLarge(f"the request body is {length} bytes; the limit is {self.app.settings.max_body_bytes}")
        body = self.rfile.read(int(length))
        try:
            return json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError("the request body is not UTF-8 JSON") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"the request body is not valid JSON: {exc}") from None

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        parsers = {"/api/chat": self.app.parse_chat, "/api/describe": self.app.parse_describe}
        if path not in parsers:
            return self._error(404, f"not found: {path}")
        try:
            parsed = parsers[path](self._read_json())
            job = self.app.submit(parsed)
        except _TooLarge as exc:
            self.close_connection = True
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(exc))
        except UserError as exc:
            return self._error(400, str(exc))
        except BusyError as exc:
            return self._error(503, str(exc))
        if parsed.stream:
            return self._stream_events(job)
        event = {}
        while not ("done" in event or "error" in event):
            event = job.events.get()
        if "error" in event:
            return self._error(500, event["error"])
        event.pop("done")
        self._json(200, event)

    def _stream_events(self, job: Job) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")
        self.end_headers()
        self.close_connection = True
        try:
            if job.ahead:
                self._write_event({"queued": job.ahead})
            while True:
                try:
                    event = job.events.get(timeout=self.KEEPALIVE_S)
                except queue.Empty:
                    self.wfile.write(b": waiting\n\n")
                    self.wfile.flush()
                    continue
                self._write_event(event)
                if "done" in event or "error" in event:
                    return
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            logger.info("client went away; cancelling its request")
            job.cancelled.set()

    def _write_event(self, event: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(event, ensure_ascii=False).encode("utf-8") + b"\n\n")
        self.wfile.flush()


class _TooLarge(UserError):
    pass


class DemoServer(ThreadingHTTPServer):
    """A threading HTTP server that carries the :class:`DemoApp` its handlers use."""

    daemon_threads = True

    def __init__(self, address, app: DemoApp):
        self.app = app
        super().__init__(address, DemoHandler)


def make_server(captioner: RegionCaptioner, host: str = "127.0.0.1", port: int = 7860,
                settings: Optional[DemoSettings] = None) -> DemoServer:
    """A server bound to ``host:port`` (0: any free port; see ``server.server_address``); call ``serve_forever``."""
    return DemoServer((host, port), DemoApp(captioner, settings))

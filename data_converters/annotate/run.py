"""Caption every segment of a COCO-panoptic dataset with a VLM and write Pix2Cap-format JSON.

For each image, its segments (those with pixels in the panoptic PNG) are sorted largest first and cut
into requests of at most ``--max-segments-per-request``; each request numbers its segments 1..k, draws
them (:mod:`.marks`), sends the marked image with the prompt (:mod:`.prompt`, :mod:`.client`) and keeps
one description per segment. Every finished request is cached (:mod:`.cache`) before the next one, so an
interrupted or failed run is resumed by running the same command again: nothing already answered is asked
again, and requests that failed at the API are asked then.

Work folder (``--work-dir``, default ``<out stem>_annotate/`` beside ``--out``)::

    marks/<image stem>_<k>.png, .txt    the marked image and prompt of request k (kept for inspection)
    cache/<2 hex>/<key>.json            one entry per answered request
    summary.json                        counts, tokens, cost, and every failed segment with its reason

A segment without a usable description after the re-ask is written with ``description: ""`` (the
converter drops empty descriptions and counts them); ``--retry-failed`` asks such segments again in a
request of their own, one more round per run. Segments whose re-ask failed at the API get that round on
the next run without the flag.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from data_converters.annotate.cache import ReplyCache, request_key
from gpt4roi_sft.provenance import file_sha256
from data_converters.annotate.client import MarkCaptioner
from data_converters.annotate.marks import MarkStyle, render_marks
from data_converters.annotate.prompt import PROMPT_TEMPLATE, REASK_TEMPLATE, category_hint, prompt_text
from data_converters.common import require_keys
from data_converters.synthetic import decode_panoptic
from gpt4roi_sft.atomic import atomic_open, write_json_atomic, write_text_atomic
from gpt4roi_sft.chat_api import ChatAPIError, ChatAPISettings, ChatCompletionsClient
from gpt4roi_sft.errors import DataError, UserError
from gpt4roi_sft.json_io import load_json

log = logging.getLogger(__name__)

API_KEY_ENV = ("VLM_API_KEY", "OPENAI_API_KEY")
# A refusal with one of these means the key, the permissions or the model name is wrong: stop asking.
STOP_STATUSES = (401, 403, 404)
# Failure reasons in the summary.
NO_USABLE_REPLY = "no_usable_description"  # asked, re-asked, still missing: final unless --retry-failed
API_FAILED = "api_error"  # the request failed at the API: asked again on the next run
NOT_ATTEMPTED = "not_attempted"  # the run stopped before asking: asked on the next run


@dataclass
class AnnotateSettings:
    """Everything one run needs (the command line's options, typed)."""

    images: Path
    panoptic_json: Path
    panoptic_dir: Path
    out: Path
    work_dir: Path
    model: str = ""
    concurrency: int = 4
    max_segments_per_request: int = 20
    limit: Optional[int] = None
    dry_run: bool = False
    retry_failed: bool = False
    language: str = "English"
    category_hints: bool = True
    template: str = PROMPT_TEMPLATE
    price_per_million: Optional[tuple[float, float]] = None  # (input, output) USD per 1M tokens
    style: MarkStyle = field(default_factory=MarkStyle)


@dataclass
class Job:
    image: dict
    annotation: dict
    image_path: Path
    panoptic_path: Path


@dataclass
class ImageResult:
    """One image's outcome; the counters cover this run only except ``total_*`` (cached entries too)."""

    image_id: int
    descriptions: dict[int, str] = field(default_factory=dict)  # segment id -> text
    failed: dict[int, str] = field(default_factory=dict)  # segment id -> reason
    skipped: list[int] = field(default_factory=list)  # no pixels in the PNG
    sent: int = 0
    cached: int = 0
    planned: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_prompt_tokens: int = 0
    total_completion_tokens: int = 0
    usage_reported: bool = False
    answered_by: set = field(default_factory=set)
    error: Optional[str] = None


def balanced_chunks(items: Sequence, size: int) -> list[list]:
    """``items`` in order, cut into the fewest chunks of at most ``size`` with sizes differing by <= 1."""
    if not items:
        return []
    n = -(-len(items) // size)
    base, extra = divmod(len(items), n)
    chunks, start = [], 0
    for k in range(n):
        end = start + base + (1 if k < extra else 0)
        chunks.append(list(items[start:end]))
        start = end
    return chunks


def plan_jobs(data: dict, settings: AnnotateSettings) -> list[Job]:
    """The images to annotate (``--limit`` first ones having an annotation), their files checked up front."""
    source = settings.panoptic_json
    require_keys(data, ("images", "annotations"), str(source))
    images = {}
    for k, img in enumerate(data["images"]):
        require_keys(img, ("id", "file_name"), f"{source}: images[{k}]")
        images[img["id"]] = img
    by_image = {}
    for k, ann in enumerate(data["annotations"]):
        where = f"{source}: annotations[{k}]"
        require_keys(ann, ("image_id", "segments_info"), where)
        if ann["image_id"] not in images:
            raise DataError(f"{where}: image {ann['image_id']} is not listed in images")
        seen = set()
        for j, seg in enumerate(ann["segments_info"]):
            require_keys(seg, ("id",), f"{where}: segments_info[{j}]")
            if not isinstance(seg["id"], int) or seg["id"] in seen:
                raise DataError(f"{where}: segments_info[{j}]: id {seg['id']!r} is not a new integer")
            seen.add(seg["id"])
        by_image[ann["image_id"]] = ann
    jobs = []
    for img in data["images"]:
        ann = by_image.get(img["id"])
        if ann is None:
            continue
        png = ann.get("file_name") or str(Path(img["file_name"]).with_suffix(".png"))
        jobs.append(Job(img, ann, settings.images / img["file_name"], settings.panoptic_dir / png))
        if settings.limit is not None and len(jobs) >= settings.limit:
            break
    missing = [p for job in jobs for p in (job.image_path, job.panoptic_path) if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more missing files)" if len(missing) > 1 else ""
        raise DataError(f"{missing[0]}: no such file{more}; check --images and --panoptic-dir")
    return jobs


class Annotator:
    """Runs the requests of one image at a time (called from worker threads; shared state is the cache)."""

    def __init__(self, settings: AnnotateSettings, captioner: Optional[MarkCaptioner], categories: dict):
        self.s = settings
        self.captioner = captioner
        self.categories = categories
        self.cache = ReplyCache(settings.work_dir / "cache")
        self.marks_dir = settings.work_dir / "marks"
        self.stop = threading.Event()

    def _hint(self, seg: dict) -> str:
        category = self.categories.get(seg.get("category_id"))
        return category_hint(str(category["name"])) if category and category.get("name") else "unlabelled"

    def annotate_image(self, job: Job) -> ImageResult:
        try:
            return self._annotate_image(job)
        except BaseException:
            self.stop.set()  # a broken input file stops the run; what is cached stays
            raise

    def _annotate_image(self, job: Job) -> ImageResult:
        result = ImageResult(job.image["id"])
        segments_info = job.annotation["segments_info"]
        if self.stop.is_set():
            result.failed = {seg["id"]: NOT_ATTEMPTED for seg in segments_info}
            return result
        with Image.open(job.panoptic_path) as png:
            ids = decode_panoptic(np.asarray(png.convert("RGB")))
        expected = (job.image.get("height"), job.image.get("width"))
        if None not in expected and ids.shape != expected:
            raise DataError(f"{job.panoptic_path}: {ids.shape[1]}x{ids.shape[0]} but images[] says "
                            f"{expected[1]}x{expected[0]} for image {job.image['id']}")
        present, counts = np.unique(ids, return_counts=True)
        area = dict(zip(present.tolist(), counts.tolist()))
        order = []
        for seg in segments_info:
            if area.get(seg["id"], 0) == 0:
                result.skipped.append(seg["id"])
                log.warning("%s: segment %s has no pixels; left without a description", job.panoptic_path, seg["id"])
            else:
                order.append(seg["id"])
        order.sort(key=lambda sid: (-area[sid], sid))
        hints = {seg["id"]: self._hint(seg) for seg in segments_info}
        shas = {"image_sha256": file_sha256(job.image_path), "panoptic_sha256": file_sha256(job.panoptic_path)}
        state = {"image": None}

        def load_image() -> Image.Image:
            if state["image"] is None:
                with Image.open(job.image_path) as im:
                    image = im.convert("RGB")
                if (image.height, image.width) != ids.shape:
                    raise DataError(f"{job.image_path}: {image.width}x{image.height} but its panoptic PNG "
                                    f"{job.panoptic_path} is {ids.shape[1]}x{ids.shape[0]}")
                state["image"] = image
            return state["image"]

        for k, chunk in enumerate(balanced_chunks(order, self.s.max_segments_per_request)):
            self._run_request(job, result, f"{Path(job.image['file_name']).stem}_{k}", chunk, hints, shas, ids, load_image)
        return result

    def _run_request(self, job, result: ImageResult, name: str, segment_ids: list[int], hints: dict, shas: dict,
                     ids: np.ndarray, load_image) -> None:
        """Ask about ``segment_ids`` (or reuse the cache), then walk the cached retry rounds of its failures.

        A new retry round (one request for just the failed segments) is sent when the failures came from
        the API (a failed re-ask), or with ``--retry-failed``; at most one new request per chunk and run.
        """
        todo, round_, asked, reason = list(segment_ids), 0, False, NO_USABLE_REPLY
        while todo:
            prompt = prompt_text(len(todo), [hints[s] for s in todo] if self.s.category_hints else None,
                                 self.s.language, self.s.template)
            key = request_key(**shas, segment_ids=todo, prompt=prompt, reask_template=REASK_TEMPLATE,
                              model=self.s.model, mark_style=self.s.style.fingerprint(), round_=round_)
            stem = name + (f"_retry{round_}" if round_ else "")
            entry = self.cache.get(key) if self.s.model else None
            if entry is None:
                if round_ > 0 and (asked or (reason == NO_USABLE_REPLY and not self.s.retry_failed)):
                    break  # at most one new request per chunk and run; bad replies are retried only on request
                if self.s.dry_run:
                    self._write_marks(stem, load_image(), ids, todo, prompt)
                    result.planned += 1
                    reason = NOT_ATTEMPTED
                    break
                if self.stop.is_set():
                    reason = NOT_ATTEMPTED
                    break
                marked = self._write_marks(stem, load_image(), ids, todo, prompt)
                try:
                    outcome = self.captioner.describe(marked, prompt, list(range(1, len(todo) + 1)))
                except ChatAPIError as exc:
                    self._api_failure(result, exc)
                    reason = API_FAILED
                    break
                entry = self._entry(job, todo, round_, outcome)
                self.cache.put(key, entry)
                asked = True
                result.sent += outcome.requests
                result.prompt_tokens += outcome.prompt_tokens
                result.completion_tokens += outcome.completion_tokens
                if outcome.reask_error is not None:
                    self._api_failure(result, outcome.reask_error)
            else:
                result.cached += 1
                if self.s.dry_run and round_ == 0:
                    self._write_marks(stem, load_image(), ids, todo, prompt)
            result.total_prompt_tokens += entry.get("prompt_tokens", 0)
            result.total_completion_tokens += entry.get("completion_tokens", 0)
            result.usage_reported = result.usage_reported or bool(entry.get("usage_reported"))
            if entry.get("answered_by"):
                result.answered_by.add(entry["answered_by"])
            for sid, text in entry["descriptions"].items():
                result.descriptions[int(sid)] = text
            todo = [int(s) for s in entry["failed"]]
            reason = API_FAILED if entry.get("failure") == API_FAILED else NO_USABLE_REPLY
            round_ += 1
        for sid in todo:
            result.failed[sid] = reason

    def _api_failure(self, result: ImageResult, exc: ChatAPIError) -> None:
        result.error = result.error or str(exc)
        if exc.refused and exc.status in STOP_STATUSES:
            if not self.stop.is_set():
                log.error("%s; stopping (nothing more will be sent)", exc)
            self.stop.set()
        else:
            log.warning("image %s: %s", result.image_id, exc)

    def _write_marks(self, stem: str, image: Image.Image, ids: np.ndarray, todo: list[int], prompt: str) -> Image.Image:
        marked = render_marks(image, ids, list(enumerate(todo, start=1)), self.s.style).image
        with atomic_open(self.marks_dir / f"{stem}.png", "wb") as fh:
            marked.save(fh, format="PNG", compress_level=3)
        write_text_atomic(self.marks_dir / f"{stem}.txt", prompt + "\n")
        return marked

    def _entry(self, job: Job, todo: list[int], round_: int, outcome) -> dict:
        failed = [todo[n - 1] for n in outcome.missing]
        return {
            "image_id": job.image["id"], "file_name": job.image["file_name"], "model": self.s.model,
            "answered_by": outcome.answered_by, "round": round_, "segment_ids": todo,
            "descriptions": {str(todo[n - 1]): text for n, text in sorted(outcome.descriptions.items())},
            # a re-ask that failed at the API leaves its segments to the next run, like any API failure
            "failed": failed, "failure": (API_FAILED if outcome.reask_error else (NO_USABLE_REPLY if failed else None)),
            "error": str(outcome.reask_error) if outcome.reask_error else None,
            "problems": outcome.problems, "replies": outcome.replies, "requests": outcome.requests,
            "prompt_tokens": outcome.prompt_tokens, "completion_tokens": outcome.completion_tokens,
            "usage_reported": outcome.usage_reported,
        }


def _cost(prompt_tokens: int, completion_tokens: int, price: Optional[tuple[float, float]], reported: bool):
    if price is None or not reported:
        return None
    return round(prompt_tokens / 1e6 * price[0] + completion_tokens / 1e6 * price[1], 6)


def summarise(results: list[ImageResult], settings: AnnotateSettings) -> dict:
    """The run's counts (``summary.json``): what was described, what failed and why, requests, tokens, cost."""
    reasons = Counter(r for res in results for r in res.failed.values())
    described = [t for res in results for t in res.descriptions.values()]
    reported = any(res.usage_reported for res in results)
    tokens = {k: sum(getattr(res, k) for res in results) for k in
              ("prompt_tokens", "completion_tokens", "total_prompt_tokens", "total_completion_tokens")}
    errors = [res.error for res in results if res.error]
    return {
        "dry_run": settings.dry_run,
        "model": settings.model or None,
        "answered_by": sorted({m for res in results for m in res.answered_by}),
        "images": len(results),
        "segments": sum(len(res.descriptions) + len(res.failed) + len(res.skipped) for res in results),
        "described": len(described),
        "failed": sum(reasons.values()),
        "failed_by_reason": dict(sorted(reasons.items())),
        "skipped_no_pixels": sum(len(res.skipped) for res in results),
        "words_per_description": round(sum(len(t.split()) for t in described) / len(described), 2) if described else 0.0,
        "requests_sent": sum(res.sent for res in results),
        "requests_cached": sum(res.cached for res in results),
        "requests_planned": sum(res.planned for res in results),
        "usage_reported": reported,
        **tokens,
        "cost_usd": _cost(tokens["prompt_tokens"], tokens["completion_tokens"], settings.price_per_million, reported),
        "total_cost_usd": _cost(tokens["total_prompt_tokens"], tokens["total_completion_tokens"],
                                settings.price_per_million, reported),
        "api_error": errors[0] if errors else None,
        "failed_segments": [{"image_id": res.image_id, "segment_id": sid, "reason": why}
                            for res in results for sid, why in sorted(res.failed.items())],
    }


def build_output(data: dict, jobs: list[Job], results: list[ImageResult], settings: AnnotateSettings,
                 summary: dict) -> dict:
    """The input's COCO-panoptic dict, limited to the annotated images, a ``description`` on every segment."""
    by_id = {res.image_id: res for res in results}
    annotations = []
    for job in jobs:
        ann = copy.deepcopy(job.annotation)
        res = by_id[job.image["id"]]
        for seg in ann["segments_info"]:
            seg["description"] = res.descriptions.get(seg["id"], "")
        annotations.append(ann)
    out = {}
    for key, value in data.items():
        out[key] = {"images": [job.image for job in jobs], "annotations": annotations}.get(key, value)
    info = dict(out.get("info") or {})
    info["pix2cap_annotation"] = {
        "model": settings.model, "answered_by": summary["answered_by"], "language": settings.language,
        "max_segments_per_request": settings.max_segments_per_request,
        "images_dir": str(settings.images.resolve()), "panoptic_dir": str(settings.panoptic_dir.resolve()),
        "described": summary["described"], "failed": summary["failed"],
    }
    out["info"] = info
    return out


def run_annotation(settings: AnnotateSettings, captioner: Optional[MarkCaptioner]) -> dict:
    """Annotate (or, with ``dry_run``, only draw and plan); write the output and ``summary.json``; return the summary."""
    data = load_json(settings.panoptic_json)
    jobs = plan_jobs(data, settings)
    categories = {c.get("id"): c for c in data.get("categories", []) if isinstance(c, dict)}
    annotator = Annotator(settings, captioner, categories)
    results: dict[int, ImageResult] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, settings.concurrency))
    try:
        futures = [pool.submit(annotator.annotate_image, job) for job in jobs]
        with tqdm(total=len(jobs), desc="dry run" if settings.dry_run else "annotate", unit="img") as bar:
            for future in as_completed(futures):
                result = future.result()
                results[result.image_id] = result
                bar.update(1)
    except BaseException:  # Ctrl-C or a bad input file: drop the queue, let requests in flight finish and cache
        annotator.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    ordered = [results[job.image["id"]] for job in jobs]
    summary = summarise(ordered, settings)
    summary.update({"out": None if settings.dry_run else str(settings.out), "work_dir": str(settings.work_dir)})
    if not settings.dry_run:
        write_json_atomic(settings.out, build_output(data, jobs, ordered, settings, summary), indent=None)
    write_json_atomic(settings.work_dir / "summary.json", summary)
    return summary


def summary_line(summary: dict) -> str:
    if summary["dry_run"]:
        return (f"dry run: {summary['images']} images, {summary['segments']} segments; "
                f"{summary['requests_planned']} requests to send, {summary['requests_cached']} already cached; "
                f"marks and prompts in {summary['work_dir']}/marks")
    failed = ", ".join(f"{k} {v}" for k, v in summary["failed_by_reason"].items())
    line = (f"{summary['out']}: {summary['images']} images, {summary['segments']} segments: "
            f"{summary['described']} described, {summary['failed']} failed" + (f" ({failed})" if failed else "")
            + f"; {summary['requests_sent']} requests sent, {summary['requests_cached']} reused from the cache")
    if summary["usage_reported"]:
        line += f"; tokens {summary['prompt_tokens']} in + {summary['completion_tokens']} out"
        if summary["cost_usd"] is not None:
            line += f", ${summary['cost_usd']:.4f} (all answers so far: ${summary['total_cost_usd']:.4f})"
    elif summary["requests_sent"]:
        line += "; the endpoint reported no token usage"
    return line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, type=Path, help="folder of the images (file_name is relative to it)")
    parser.add_argument("--panoptic-json", required=True, type=Path, help="COCO-panoptic JSON (images, annotations, categories)")
    parser.add_argument("--panoptic-dir", required=True, type=Path, help="folder of the panoptic PNGs")
    parser.add_argument("--out", required=True, type=Path, help="Pix2Cap-format JSON to write")
    parser.add_argument("--base-url", help="OpenAI-compatible API root, e.g. https://api.openai.com/v1")
    parser.add_argument("--model", help="model name sent in each request")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    parser.add_argument("--max-segments-per-request", type=int, default=20,
                        help="segments marked in one image; more become several requests (default 20)")
    parser.add_argument("--limit", type=int, help="annotate only the first N images")
    parser.add_argument("--dry-run", action="store_true", help="draw the marks and write the prompts; send nothing")
    parser.add_argument("--work-dir", type=Path, help="marks, cache and summary (default <out stem>_annotate/)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="ask again, in a request of their own, segments that got no usable description")
    parser.add_argument("--language", default="English", help="language of the descriptions (default English)")
    parser.add_argument("--no-category-hints", action="store_true",
                        help="do not tell the model the segmentation's class names")
    parser.add_argument("--prompt-file", type=Path, help="own prompt template with {count}, {language} and {hints}")
    parser.add_argument("--max-tokens", type=int, help="reply token limit (default: 80 per segment + 200)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--request-params", help='extra request fields as JSON, e.g. \'{"max_completion_tokens": 4000, '
                        '"max_tokens": null}\' (null removes a field)')
    parser.add_argument("--price", type=float, nargs=2, metavar=("IN", "OUT"),
                        help="USD per million input and output tokens, for the cost in the summary")
    parser.add_argument("--max-side", type=int, default=MarkStyle.max_side, help="downscale larger images first (default 1024)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    parser.add_argument("--max-retries", type=int, default=6, help="retries after 429/5xx/timeouts (default 6)")
    parser.add_argument("--backoff", type=float, default=2.0, help="first retry wait in seconds, doubling (default 2)")
    parser.add_argument("--max-backoff", type=float, default=60.0, help="longest retry wait in seconds (default 60)")


def _template(path: Optional[Path]) -> str:
    if path is None:
        return PROMPT_TEMPLATE
    try:
        template = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"--prompt-file {path}: {exc.strerror}") from None
    try:
        prompt_text(3, ["a", "b", "c"], "English", template)
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"--prompt-file {path}: bad placeholder {exc} (allowed: {{count}}, {{language}}, {{hints}})") from None
    return template


def _request_params(args: argparse.Namespace) -> dict:
    params: dict = {"temperature": args.temperature}
    if args.max_tokens is not None:
        params["max_tokens"] = args.max_tokens
    if args.request_params:
        try:
            extra = json.loads(args.request_params)
        except json.JSONDecodeError as exc:
            raise UserError(f"--request-params: not JSON ({exc.msg})") from None
        if not isinstance(extra, dict):
            raise UserError("--request-params: expected a JSON object")
        params.update(extra)
    return params


def main(argv=None, environ=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_converters.annotate",
                                     description="Caption every panoptic segment with a VLM (Set-of-Mark); "
                                                 "`review` subcommand: check a sample by hand.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    environ = os.environ if environ is None else environ
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.dry_run and not (args.base_url and args.model):
        raise UserError("--base-url and --model are required (or --dry-run to only draw the marks)")
    for flag, value in (("--concurrency", args.concurrency), ("--max-segments-per-request", args.max_segments_per_request),
                        ("--max-side", args.max_side)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.limit is not None and args.limit < 0:
        raise UserError(f"--limit must be >= 0, got {args.limit}")
    for flag, path in (("--images", args.images), ("--panoptic-dir", args.panoptic_dir)):
        if not path.is_dir():
            raise UserError(f"{flag} {path}: no such folder")
    work_dir = args.work_dir or args.out.with_name(args.out.stem + "_annotate")
    settings = AnnotateSettings(
        images=args.images, panoptic_json=args.panoptic_json, panoptic_dir=args.panoptic_dir, out=args.out,
        work_dir=work_dir, model=args.model or "", concurrency=args.concurrency,
        max_segments_per_request=args.max_segments_per_request, limit=args.limit, dry_run=args.dry_run,
        retry_failed=args.retry_failed, language=args.language, category_hints=not args.no_category_hints,
        template=_template(args.prompt_file), price_per_million=tuple(args.price) if args.price else None,
        style=MarkStyle(max_side=args.max_side))
    captioner = None
    if not args.dry_run:
        api_key = next((environ[name] for name in API_KEY_ENV if environ.get(name)), None)
        client = ChatCompletionsClient(ChatAPISettings(base_url=args.base_url, model=args.model, timeout_s=args.timeout,
                                                       max_api_retries=args.max_retries, backoff_s=args.backoff,
                                                       max_backoff_s=args.max_backoff), api_key=api_key, name="VLM")
        captioner = MarkCaptioner(client, _request_params(args))
    summary = run_annotation(settings, captioner)
    print(summary_line(summary))
    reasons = summary["failed_by_reason"]
    unasked = reasons.get(API_FAILED, 0) + reasons.get(NOT_ATTEMPTED, 0)
    if unasked and not settings.dry_run:
        log.error("%d segments were not answered (%s); rerun the same command to ask only those",
                  unasked, summary["api_error"] or "the run stopped")
        return 1
    return 0

"""ViP-Bench's LLM judge: the official prompt and parse/retry rule, any OpenAI-compatible endpoint, a disk cache.

The grading rule is that of ViP-LLaVA's ``scripts/eval/vip-bench_evaluator.py`` (an MM-Vet derivative):

- one user message ``JUDGE_PROMPT + "\\n" + " | ".join([question, answer, prediction, ""])`` where the
  question is the split's ``questions.jsonl`` text and ``<AND>``/``<OR>`` in the answer get spaces around
  them; ``max_tokens=3``, ``temperature=0``;
- score = ``float(reply.split(' ')[0].strip())``, accepted only in [0, 1];
- on a parse failure it asks again with the *meta* question (placeholders ``<obj>`` intact) and the suffix
  ``"\\nPredict the correctness of the answer (digit): "``. The official loop raises the temperature by
  0.5 *after* each retry request, so the temperatures are 0, 0, 0.5, 1.0, 1.5; after the fifth unparsable
  reply the score is 0.0. (The official code sends a sixth request whose reply it never reads; it cannot
  change the score, so it is not sent here.)
- API errors: the official script sleeps and retries forever; here retries are bounded (exponential
  backoff, configurable; :mod:`gpt4roi_sft.chat_api`), after which the item stays ungraded rather than scored.

The key is passed in by the caller (entry points read ``JUDGE_API_KEY``/``OPENAI_API_KEY``), goes only into
the ``Authorization`` header, and is redacted from every message this module logs or raises.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, runtime_checkable

from eval.prediction_store import must_start_afresh
from gpt4roi_sft.atomic import write_json_atomic
from gpt4roi_sft.chat_api import ChatAPIError, ChatAPISettings, ChatCompletionsClient
from gpt4roi_sft.errors import DataError, UserError

logger = logging.getLogger(__name__)

JUDGE_PROMPT = """Compare the ground truth and prediction from AI models, to give a correctness score for the prediction. <AND> in the ground truth means it is totally right only when all elements in the ground truth are present in the prediction, and <OR> means it is totally right when any one element in the ground truth is present in the prediction. The correctness score is 0.0 (totally wrong), 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, or 1.0 (totally right). Just complete the last space of the correctness score.

Question | Ground truth | Prediction | Correctness
--- | --- | --- | ---
What is x in the equation within the yellow rectangle? | -1 <AND> -5 | x = 3 | 0.0
What is x in the equation within the yellow rectangle? | -1 <AND> -5 | x = -1 | 0.5
What is x in the equation within the yellow rectangle? | -1 <AND> -5 | x = -5 | 0.5
What is x in the equation within the red rectangle? | -1 <AND> -5 | x = -5 or 5 | 0.5
What is x in the equation within the orange rectangle? | -1 <AND> -5 | x = -1 or x = -5 | 1.0
Can you explain this meme within the blue rectangle? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme talks about Iceland and Greenland. It's pointing out that despite their names, Iceland is not very icy and Greenland isn't very green. | 0.4
Can you explain this meme within the blue rectangle? | This meme is poking fun at the fact that the names of the countries Iceland and Greenland are misleading. Despite its name, Iceland is known for its beautiful green landscapes, while Greenland is mostly covered in ice and snow. The meme is saying that the person has trust issues because the names of these countries do not accurately represent their landscapes. | The meme is using humor to point out the misleading nature of Iceland's and Greenland's names. Iceland, despite its name, has lush green landscapes while Greenland is mostly covered in ice and snow. The text 'This is why I have trust issues' is a playful way to suggest that these contradictions can lead to distrust or confusion. The humor in this meme is derived from the unexpected contrast between the names of the countries and their actual physical characteristics. | 1.0
"""
RETRY_SUFFIX = "\nPredict the correctness of the answer (digit): "
MAX_TRIES = 5  # official: at most 5 judge replies per grade, then 0.0
API_KEY_ENV = ("JUDGE_API_KEY", "OPENAI_API_KEY")


class JudgeError(UserError):
    """The judge cannot be used: refused the request (4xx), or unreachable after the bounded retries."""


def resolve_api_key(environ: Mapping[str, str]) -> Optional[str]:
    """The judge key from ``JUDGE_API_KEY``, else ``OPENAI_API_KEY``, else ``None`` (for keyless servers)."""
    for name in API_KEY_ENV:
        if environ.get(name):
            return environ[name]
    return None


def build_query(question: str, answer: str, prediction: str, retry: bool = False) -> str:
    """The official judge message; ``retry`` appends the "(digit)" request used after a parse failure."""
    gt = answer.replace("<AND>", " <AND> ").replace("<OR>", " <OR> ")
    query = JUDGE_PROMPT + "\n" + " | ".join([question, gt, prediction, ""])
    return query + RETRY_SUFFIX if retry else query


def parse_score(content: Optional[str]) -> Optional[float]:
    """The official parse: first space-separated token as a float in [0, 1]; ``None`` when it is not."""
    try:
        value = float((content or "").split(" ")[0].strip())
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None  # NaN fails both comparisons


@dataclass
class JudgeSettings(ChatAPISettings):
    """Where the judge lives, how patiently to talk to it (see :class:`ChatAPISettings`), and the grading knobs."""

    concurrency: int = 4
    max_tokens: int = 3



@runtime_checkable
class Judge(Protocol):
    """A judge backend: whatever answers one grading message. A new backend is one class with these members.

    ``model``: the name its grades are cached under (grading again with another model regrades);
    ``concurrency``: how many :meth:`complete` calls :func:`grade_all` may have in flight;
    ``complete(content, temperature)``: send ``content`` as one user message, return ``(reply text, id of the
    model that answered)``; raise :class:`JudgeError` when the backend cannot be used (the items left stay
    ungraded). The grading rule (prompt, parse, retries) is not the backend's business: see :func:`grade`.
    """

    model: str
    concurrency: int

    def complete(self, content: str, temperature: float) -> Tuple[str, str]: ...


class ChatCompletionsJudge(ChatCompletionsClient):
    """:class:`Judge` backed by an OpenAI-compatible ``/chat/completions`` endpoint (:mod:`gpt4roi_sft.chat_api`)."""

    def __init__(self, settings: JudgeSettings, api_key: Optional[str] = None, sleep: Callable[[float], None] = time.sleep):
        super().__init__(settings, api_key=api_key, name="judge", sleep=sleep)

    @property
    def model(self) -> str:
        return self.settings.model

    @property
    def concurrency(self) -> int:
        return self.settings.concurrency

    def complete(self, content: str, temperature: float) -> Tuple[str, str]:
        """Send one user message; return ``(reply text, model id)``. Retries API errors with backoff."""
        try:
            reply = self.create([{"role": "user", "content": content}], max_tokens=self.settings.max_tokens,
                                temperature=temperature)
        except ChatAPIError as exc:
            hint = "; check --judge-model and the API key variable" if exc.refused else ""
            raise JudgeError(f"{exc}{hint}") from None
        return reply.text, reply.model


@dataclass
class Grade:
    """One judgement: the score, the judge's last reply, how many replies it took, the model that answered."""

    score: float
    content: str
    tries: int
    model: str


def grade(judge: Judge, question: str, retry_question: str, answer: str, prediction: str,
          max_tries: int = MAX_TRIES) -> Grade:
    """Grade one prediction with the official parse/retry rule (see the module docstring)."""
    temperature = 0.0
    content, model = judge.complete(build_query(question, answer, prediction), temperature)
    tries = 1
    while True:
        score = parse_score(content)
        if score is not None:
            return Grade(score, content, tries, model)
        if tries >= max_tries:
            return Grade(0.0, content, tries, model)
        content, model = judge.complete(build_query(retry_question, answer, prediction, retry=True), temperature)
        tries += 1
        temperature += 0.5


@dataclass(frozen=True)
class JudgeItem:
    """What the judge sees for one question: ``question`` from questions.jsonl, ``retry_question`` from the meta file."""

    qid: str
    question: str
    retry_question: str
    answer: str
    prediction: str

    def fingerprint(self, judge_model: str) -> str:
        """Changes when anything the judge is asked changes, so a cached grade is never reused wrongly."""
        blob = json.dumps([judge_model, self.question, self.retry_question, self.answer, self.prediction])
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class GradeCache:
    """``grades.json``: ``{"setup": {...}, "grades": {qid: {"fingerprint": str, "runs": {"0": Grade, ...}}}}``,
    rewritten atomically per grade.

    Each grade is keyed by what the judge saw (:meth:`JudgeItem.fingerprint`), so it is never reused for
    another answer. ``setup`` ties the whole cache to the run whose answers it grades (the prediction store's
    setup: model and adapter weights, decoding, test files): opening a cache written for another setup is a
    one-line error naming what changed, or, with ``overwrite``, an empty cache.
    """

    def __init__(self, path: Path, setup: Optional[dict] = None, overwrite: bool = False):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.data: Dict[str, dict] = {}
        self.setup: Optional[dict] = None
        if self.path.exists():
            try:
                stored = json.loads(self.path.read_text(encoding="utf-8"))
                self.data = stored["grades"]
                self.setup = stored.get("setup")
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise DataError(f"{self.path}: not a grade cache ({exc}); move it away to regrade") from None
        if setup is not None:
            setup = json.loads(json.dumps(setup))
            if must_start_afresh(self.path, self.setup, setup, holds_results=bool(self.data), overwrite=overwrite,
                                 what="grades of another setup's answers", redo="regrade afresh"):
                self.data = {}
            self.setup = setup

    def get(self, item: JudgeItem, run: int, judge_model: str) -> Optional[Grade]:
        entry = self.data.get(item.qid)
        if not entry or entry.get("fingerprint") != item.fingerprint(judge_model):
            return None
        g = entry["runs"].get(str(run))
        return Grade(**g) if g else None

    def put(self, item: JudgeItem, run: int, judge_model: str, g: Grade) -> None:
        with self._lock:
            fp = item.fingerprint(judge_model)
            entry = self.data.get(item.qid)
            if not entry or entry.get("fingerprint") != fp:
                entry = self.data[item.qid] = {"fingerprint": fp, "runs": {}}
            entry["runs"][str(run)] = asdict(g)
            write_json_atomic(self.path, {"setup": self.setup, "grades": self.data})


@dataclass
class GradingOutcome:
    """``scores[qid][run]`` for every grade available (cached or new); ``error`` why grading stopped early."""

    scores: Dict[str, Dict[int, float]]
    attempted: int  # item-runs sent to the judge in this call (cached ones are not)
    judge_model: Optional[str]
    error: Optional[str] = None


def grade_all(items: Sequence[JudgeItem], judge: Judge, cache: GradeCache, runs: int = 1,
              max_tries: int = MAX_TRIES) -> GradingOutcome:
    """Grade every (item, run) not in ``cache``, ``judge.concurrency`` at a time, caching each grade.

    A :class:`JudgeError` stops new requests (those in flight finish and are cached); the outcome carries
    the error and the items left out stay ungraded.
    """
    model_key = judge.model
    todo = [(item, run) for run in range(runs) for item in items if cache.get(item, run, model_key) is None]
    stop = threading.Event()
    errors: List[str] = []
    answering: List[str] = []

    def work(item: JudgeItem, run: int) -> None:
        if stop.is_set():
            return
        try:
            g = grade(judge, item.question, item.retry_question, item.answer, item.prediction, max_tries)
        except JudgeError as exc:
            stop.set()
            errors.append(str(exc))
            return
        cache.put(item, run, model_key, g)
        answering.append(g.model)

    if todo:
        logger.info("judge: grading %d item-runs (%d already cached)", len(todo), len(items) * runs - len(todo))
        with ThreadPoolExecutor(max_workers=max(1, judge.concurrency)) as pool:
            for f in as_completed([pool.submit(work, item, run) for item, run in todo]):
                f.result()
    if errors:
        logger.error("judge: stopped early: %s", errors[0])
    scores: Dict[str, Dict[int, float]] = {}
    models = set(answering)
    for item in items:
        for run in range(runs):
            g = cache.get(item, run, model_key)
            if g is not None:
                scores.setdefault(item.qid, {})[run] = g.score
                models.add(g.model)
    judge_model = ", ".join(sorted(models)) if models else model_key
    return GradingOutcome(scores, attempted=len(todo), judge_model=judge_model, error=errors[0] if errors else None)

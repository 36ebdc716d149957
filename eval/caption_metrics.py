"""Caption metrics exactly as pycocoevalcap computes them, without its offline-fatal SPICE set-up.

``COCOEvalCap.evaluate()`` builds ``Spice()`` in its scorer list, whose constructor downloads Stanford
CoreNLP 3.6.0; offline that raises and the whole evaluation is lost. Here the same steps run directly:
PTB tokenization (Java, CoreNLP 3.4.1 shipped in the wheel), then Bleu(4), Meteor, Rouge and Cider on the
tokenized text. SPICE runs only when the user gives a folder with ``stanford-corenlp-3.6.0.jar`` and
``stanford-corenlp-3.6.0-models.jar``; otherwise it is reported as ``None`` with one logged reason.

All values are fractions as pycocoevalcap returns them (CIDEr may exceed 1); papers print them x100.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

logger = logging.getLogger(__name__)

METRIC_KEYS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def ptb_tokenize(captions: Mapping[object, List[str]]) -> Dict[object, List[str]]:
    """PTB-tokenize ``{id: [caption, ...]}`` (lower-cased, punctuation removed) with pycocoevalcap's tokenizer."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})


def scoring_unavailable_reason() -> Optional[str]:
    """Why BLEU/METEOR/ROUGE-L/CIDEr cannot run on this machine (``None`` when they can).

    pycocoevalcap's PTB tokenizer and METEOR are Java programs: both the package and ``java`` are needed. A GPU
    machine often has neither; predictions made there are scored later anywhere with ``--score-only``.
    """
    import importlib.util

    missing = []
    if importlib.util.find_spec("pycocoevalcap") is None:
        missing.append("pycocoevalcap (pip install pycocoevalcap==1.2)")
    if shutil.which("java") is None:
        missing.append("java on PATH (e.g. apt-get install default-jre-headless)")
    return "scoring needs " + " and ".join(missing) if missing else None


def spice_unavailable_reason(spice_jars: Optional[os.PathLike | str]) -> Optional[str]:
    """Why SPICE cannot run with ``spice_jars`` (``None`` when it can)."""
    if not spice_jars:
        return ("SPICE needs Stanford CoreNLP 3.6.0, which pycocoevalcap downloads at first use (not possible "
                "offline); pass --spice-jars DIR holding " + " and ".join(CORENLP_JARS))
    folder = Path(spice_jars)
    missing = [j for j in CORENLP_JARS if not (folder / j).is_file()]
    if missing:
        return f"--spice-jars {folder}: missing {', '.join(missing)}"
    if shutil.which("java") is None:
        return "SPICE needs java on PATH"
    return None


def _spice_layout(spice_jars: Path, where: Path) -> Path:
    """Lay out spice-1.0.jar + lib/ (the wheel's jars and the user's CoreNLP jars) under ``where``.

    spice-1.0.jar finds its dependencies through its manifest's relative ``lib/`` class path, so symlinks in
    a private folder give it a complete class path without writing into the installed package.
    """
    import pycocoevalcap

    pkg_spice = Path(list(pycocoevalcap.__path__)[0]) / "spice"
    (where / "lib").mkdir(parents=True)
    (where / "spice-1.0.jar").symlink_to(pkg_spice / "spice-1.0.jar")
    for jar in (pkg_spice / "lib").glob("*.jar"):
        (where / "lib" / jar.name).symlink_to(jar)
    for name in CORENLP_JARS:
        (where / "lib" / name).symlink_to((spice_jars / name).resolve())
    return where / "spice-1.0.jar"


def spice_score(gts: Mapping[object, List[str]], res: Mapping[object, List[str]], spice_jars: os.PathLike | str) -> float:
    """SPICE as ``pycocoevalcap.spice.Spice.compute_score`` computes it (mean of per-sample F; NaN propagates).

    ``gts``/``res`` are PTB-tokenized ``{id: [str]}``. The ``-cache`` option is left out: its LMDB cache is
    known to fail on Java > 8 and does not change scores.
    """
    ids = sorted(gts.keys())
    data = [{"image_id": i, "test": res[i][0], "refs": gts[i]} for i in ids]
    with tempfile.TemporaryDirectory(prefix="spice_") as tmp:
        tmp = Path(tmp)
        jar = _spice_layout(Path(spice_jars), tmp / "spice")
        in_file, out_file = tmp / "in.json", tmp / "out.json"
        in_file.write_text(json.dumps(data))
        cmd = ["java", "-jar", "-Xmx8G", str(jar), str(in_file), "-out", str(out_file), "-subset", "-silent"]
        subprocess.run(cmd, check=True, cwd=jar.parent)
        results = json.loads(out_file.read_text())

    def as_float(v):
        try:
            return float(v)
        except (TypeError, ValueError):
            return np.nan

    return float(np.mean(np.array([as_float(item["scores"]["All"]["f"]) for item in results])))


class MeteorJar:
    """pycocoevalcap's METEOR 1.5 (``meteor-1.5.jar -stdio``, started exactly as its ``Meteor`` starts it),
    kept open so that several scorings pay its start-up (loading the paraphrase table, seconds) once.

    Sentence statistics are cached by their SCORE line, so a pair scored twice is computed once;
    :meth:`compute_score` returns what ``Meteor().compute_score(gts, res)`` returns. Start-up is lazy.
    """

    def __init__(self):
        import threading

        self.proc = None
        self._stats: Dict[str, str] = {}
        self._lock = threading.Lock()  # one request at a time on the pipes (a shared jar may serve threads)

    def __enter__(self) -> "MeteorJar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ask(self, lines: List[str], num_answers: int) -> List[str]:
        """Send ``lines`` from a writer thread (so neither pipe fills up) and read ``num_answers`` lines back."""
        with self._lock:
            return self._ask_locked(lines, num_answers)

    def _ask_locked(self, lines: List[str], num_answers: int) -> List[str]:
        import threading

        if self.proc is None:
            import pycocoevalcap.meteor.meteor as coco_meteor

            folder = os.path.dirname(os.path.abspath(coco_meteor.__file__))
            cmd = ["java", "-jar", "-Xmx2G", coco_meteor.METEOR_JAR, "-", "-", "-stdio", "-l", "en", "-norm"]
            self.proc = subprocess.Popen(cmd, cwd=folder, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL)

        def write():
            for line in lines:
                self.proc.stdin.write((line + "\n").encode())
            self.proc.stdin.flush()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        answers = []
        for _ in range(num_answers):
            raw = self.proc.stdout.readline()
            if not raw:
                raise RuntimeError("meteor-1.5.jar exited early (is java on PATH?)")
            answers.append(raw.decode().strip())
        writer.join()
        return answers

    def stats(self, gts: Mapping[object, List[str]], res: Mapping[object, List[str]]) -> List[str]:
        """Statistics of each tokenized ``res[id][0]`` against ``gts[id]``, in the order of ``gts``."""
        lines = []
        for k in gts:
            # pycocoevalcap's Meteor._stat: '|||' removed from the hypothesis, one pass of double-space collapsing
            hypothesis = res[k][0].replace("|||", "").replace("  ", " ")
            lines.append(" ||| ".join(("SCORE", " ||| ".join(gts[k]), hypothesis)))
        todo = list(dict.fromkeys(line for line in lines if line not in self._stats))
        if todo:
            self._stats.update(zip(todo, self._ask(todo, len(todo))))
        return [self._stats[line] for line in lines]

    def evaluate(self, stats: List[str]) -> Tuple[float, List[float]]:
        """``(corpus METEOR, per-sentence METEOR)`` of a list of statistics (one EVAL request)."""
        answers = self._ask(["EVAL ||| " + " ||| ".join(stats)], len(stats) + 1)
        return float(answers[-1]), [float(a) for a in answers[:-1]]

    def compute_score(self, gts: Mapping[object, List[str]], res: Mapping[object, List[str]]) -> Tuple[float, List[float]]:
        return self.evaluate(self.stats(gts, res))

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.kill()
            self.proc.wait()
            self.proc = None


_SHARED_METEOR: Optional[MeteorJar] = None


def shared_meteor_jar() -> MeteorJar:
    """This process's one :class:`MeteorJar`, started at its first request and closed at exit.

    METEOR 1.5 takes ~10 s of start-up (and ~1.2 GB) to load its paraphrase table, then ~10 ms a request: a
    program that scores more than once (shards merged and scored, a segmentation run's caption metrics and mAP,
    a test suite) pays the start-up once. Results do not depend on what the jar scored before.
    """
    global _SHARED_METEOR
    if _SHARED_METEOR is None:
        import atexit

        _SHARED_METEOR = MeteorJar()
        atexit.register(_SHARED_METEOR.close)
    return _SHARED_METEOR


def score_captions(references: Mapping[object, List[str]], predictions: Mapping[object, str],
                   spice_jars: Optional[os.PathLike | str] = None,
                   meteor: Optional[MeteorJar] = None) -> Tuple[Dict[str, Optional[float]], Optional[str]]:
    """Score ``predictions`` ``{id: caption}`` against ``references`` ``{id: [caption, ...]}``.

    Both must cover the same ids (as COCOEvalCap requires). Returns ``(metrics, spice_note)``: metrics has
    exactly :data:`METRIC_KEYS` (fractions; ``SPICE`` ``None`` when it cannot run) and ``spice_note`` says
    why SPICE is missing (``None`` when it ran). ``meteor``: the :class:`MeteorJar` to ask (default: the
    process's :func:`shared_meteor_jar`).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(references) != set(predictions):
        missing = sorted(set(references) - set(predictions), key=str)[:5]
        extra = sorted(set(predictions) - set(references), key=str)[:5]
        raise ValueError(f"predictions and references cover different ids (missing e.g. {missing}, extra e.g. {extra})")
    if not references:
        raise ValueError("nothing to score: no predictions")
    gts = ptb_tokenize(references)
    res = ptb_tokenize({k: [v] for k, v in predictions.items()})

    metrics: Dict[str, Optional[float]] = {}
    bleu, _ = Bleu(4).compute_score(gts, res)
    for n, value in enumerate(bleu, start=1):
        metrics[f"Bleu_{n}"] = float(value)
    metrics["METEOR"] = float((meteor or shared_meteor_jar()).compute_score(gts, res)[0])
    for name, scorer in (("ROUGE_L", Rouge), ("CIDEr", Cider)):
        value, _ = scorer().compute_score(gts, res)
        metrics[name] = float(value)

    note = spice_unavailable_reason(spice_jars)
    if note is None:
        try:
            metrics["SPICE"] = spice_score(gts, res, spice_jars)
        except (subprocess.CalledProcessError, OSError, ValueError, KeyError) as exc:
            note = f"SPICE failed: {exc}"
    if note is not None:
        metrics["SPICE"] = None
        logger.warning("SPICE: null (%s)", note)
    return {k: metrics[k] for k in METRIC_KEYS}, note


def format_metrics_table(metrics: Mapping[str, Optional[float]]) -> str:
    """The x100 table papers print, one metric per column (``-`` for a metric that could not run)."""
    header = " | ".join(f"{k:>7}" for k in METRIC_KEYS)
    values = " | ".join(f"{'-' if metrics.get(k) is None else f'{100 * metrics[k]:.1f}':>7}" for k in METRIC_KEYS)
    return f"{header}\n{values}\n"

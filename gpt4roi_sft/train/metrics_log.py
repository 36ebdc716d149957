"""Per-step training metrics: ``train_log.jsonl``, TensorBoard scalars and the final ``loss.png`` (rank 0 only)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence

log = logging.getLogger(__name__)


class MetricsLog:
    """Appends one JSON line per optimizer step; on resume, drops lines past the resumed step first.

    Dropping them keeps the log equal to an uninterrupted run's: steps logged after the last checkpoint
    of a crashed run are repeated by the resumed run, not duplicated.
    """

    def __init__(self, output_dir, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(output_dir) / "train_log.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(resume_step)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"), purge_step=resume_step + 1)
            except Exception as exc:  # tensorboard missing or broken: the JSONL log still has everything
                log.warning("TensorBoard logging disabled: %s", exc)

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                break  # a torn last line from a crash
        from gpt4roi_sft.atomic import write_text_atomic

        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def log(self, record: Dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def read_log(output_dir) -> List[Dict]:
    path = Path(output_dir) / "train_log.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def smooth_losses(values: Sequence[float], window: int) -> List[float]:
    """A centred moving average whose window narrows at both ends, taken on log values when all are positive.

    A trailing average lags a curve that falls fast, as a loss does in its first steps (it would draw the
    early loss well above the raw one); a centred window does not lag, and narrowing it at the ends keeps
    the first and last points at their raw values. Averaging logs (a geometric mean) suits the log scale
    the curve is drawn on.
    """
    import math

    n = len(values)
    use_log = all(v > 0 for v in values)
    xs = [math.log(v) for v in values] if use_log else list(values)
    half = max(0, window // 2)
    out = []
    for i in range(n):
        h = min(half, i, n - 1 - i)
        mean = sum(xs[i - h : i + h + 1]) / (2 * h + 1)
        out.append(math.exp(mean) if use_log else mean)
    return out


def plot_loss(output_dir, out_path: Optional[str] = None) -> Optional[Path]:
    """Draw the loss curve of ``train_log.jsonl`` to ``loss.png`` (raw and :func:`smooth_losses`)."""
    records = read_log(output_dir)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    window = max(1, len(losses) // 20) | 1
    smooth = smooth_losses(losses, window)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"centred average ({window} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over labelled tokens)")
    if min(losses) > 0:
        ax.set_yscale("log")  # the late, slow part of the curve is where region learning shows
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_path) if out_path else Path(output_dir) / "loss.png"
    tmp = out.with_name("." + out.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out

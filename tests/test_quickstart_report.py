"""quickstart.report: the before/after comparison the quickstart prints last."""

import json
import subprocess
import sys
from pathlib import Path

from tests.test_eval_vg import write_test_file

ROOT = Path(__file__).resolve().parents[1]


def eval_dir(path: Path, cider: float, accuracy: float, captions) -> Path:
    path.mkdir()
    metrics = {"Bleu_1": 0.1, "CIDEr": cider}
    (path / "summary.json").write_text(json.dumps({"metrics": metrics, "num_samples": len(captions),
                                                   "attribute_accuracy": {"accuracy": accuracy, "chance": 0.25}}))
    (path / "predictions.json").write_text(json.dumps([{"image_id": i, "caption": c} for i, c in captions.items()]))
    return path


def test_report_compares_both_runs_and_draws_the_first_image(tmp_path):
    ann, images = write_test_file(tmp_path, n=4)
    captions = {i: f"caption {i}" for i in range(1, 5)}
    before = eval_dir(tmp_path / "before", 0.05, 0.1, captions)
    after = eval_dir(tmp_path / "after", 0.45, 0.6, captions)
    (tmp_path / "train").mkdir()
    proc = subprocess.run([sys.executable, "-m", "quickstart.report", "--before", str(before), "--after", str(after),
                           "--train-dir", str(tmp_path / "train"), "--annotations", str(ann),
                           "--image-root", str(images), "--out", str(tmp_path / "report")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["attribute_accuracy"] == {"before": 0.1, "after": 0.6, "chance": 0.25}
    assert "CIDEr gain: +40.0 points." in proc.stdout
    assert (tmp_path / "report" / "example_captions.png").stat().st_size > 0

"""The quickstart's spread over seeds: ``scripts/quickstart.sh`` from nothing, once per seed, and what each learned.

Each seed draws another synthetic data set, tiny random model and training order, so the spread is what a user
can expect on this machine. Every run goes in its own fresh folder (``--runs DIR/seed<N>``), is timed from the
outside (data, model, training, export, both evaluations, segmentation captioning, report; ``.venv`` already
present), and its ``report.json`` is read back.

    python bench/quickstart_seeds.py [--seeds 0 1 2] [--runs runs/quickstart_spread] [--out FILE] [--overwrite]

Writes ``bench/results/<date>_cpu_quickstart_seeds.json`` (by default) and prints the README's table rows.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.throughput.device import device_name  # noqa: E402
from gpt4roi_sft.atomic import write_json_atomic  # noqa: E402
from gpt4roi_sft.json_io import load_json  # noqa: E402
from quickstart.report import SEGCAP_KEYS  # noqa: E402


def run_seed(seed: int, run_dir: Path, port: int) -> dict:
    """One quickstart from nothing in ``run_dir``; its wall time and the figures of its report."""
    run_dir.mkdir(parents=True)
    env = {**os.environ, "QUICKSTART_SEED": str(seed), "QUICKSTART_RUN": str(run_dir), "MASTER_PORT": str(port)}
    log_path = run_dir / "quickstart.log"
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "quickstart.sh")], cwd=ROOT, env=env,
                              stdout=log_file, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed}: scripts/quickstart.sh exited {proc.returncode}; see {log_path}")
    report = load_json(run_dir / "report.json")
    attrs = report["attribute_accuracy"]
    return {
        "seed": seed,
        "wall_s": round(wall, 1),
        "training_steps": report["training"]["steps"],
        "training_s_of_steps": report["training"]["seconds"],
        "last_loss": report["training"]["last_loss"],
        "attribute_accuracy": attrs["after"],
        "chance": attrs["chance"],
        "ratio_to_chance": attrs["after"] / attrs["chance"],
        "per_attribute": attrs.get("per_attribute_after"),
        "after": {k: report["after"][k] for k in ("Bleu_4", "METEOR", "ROUGE_L", "CIDEr")},
        "before_CIDEr": report["before"]["CIDEr"],
        "segcap": {k: v for k, v in (report.get("segmentation_captioning") or {}).items()
                   if k in SEGCAP_KEYS},
    }


def table_rows(runs: List[dict]) -> List[str]:
    """README rows: seed, wall time, caption metrics x100, attribute accuracy (chance, ratio)."""
    rows = []
    for r in runs:
        a = r["after"]
        rows.append(f"| {r['seed']} | {r['wall_s']:.0f} s | {100 * a['Bleu_4']:.1f} | {100 * a['METEOR']:.1f} | "
                    f"{100 * a['ROUGE_L']:.1f} | {100 * a['CIDEr']:.1f} | {100 * r['attribute_accuracy']:.1f} "
                    f"({100 * r['chance']:.1f}; {r['ratio_to_chance']:.1f}x) |")
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "quickstart_spread",
                    help="each seed's run goes in RUNS/seed<N>")
    ap.add_argument("--out", type=Path, help="results JSON (default bench/results/<date>_cpu_quickstart_seeds.json)")
    ap.add_argument("--overwrite", action="store_true", help="remove an earlier run of a seed first")
    ap.add_argument("--port", type=int, default=29560, help="MASTER_PORT of the first seed's training (+1 per seed)")
    args = ap.parse_args(argv)
    day = _dt.date.today().isoformat()
    out = args.out or ROOT / "bench" / "results" / f"{day}_cpu_quickstart_seeds.json"
    for seed in args.seeds:
        run_dir = args.runs / f"seed{seed}"
        if run_dir.exists():
            if not args.overwrite:
                print(f"{run_dir} exists: a measurement starts from nothing; pass --overwrite to remove it",
                      file=sys.stderr)
                return 2
            shutil.rmtree(run_dir)
    recipe = quickstart_recipe()
    runs = []
    for i, seed in enumerate(args.seeds):
        runs.append(run_seed(seed, args.runs / f"seed{seed}", args.port + i))
        r = runs[-1]
        print(f"seed {seed}: {r['wall_s']:.0f} s, attribute accuracy {100 * r['attribute_accuracy']:.1f} "
              f"(chance {100 * r['chance']:.1f}, {r['ratio_to_chance']:.2f}x), CIDEr {100 * r['after']['CIDEr']:.1f}",
              flush=True)
    result = {
        "machine": device_name(torch.device("cpu")) + ", no GPU",
        "date": day,
        "command": "python bench/quickstart_seeds.py --seeds " + " ".join(map(str, args.seeds))
                   + " (QUICKSTART_SEED=N bash scripts/quickstart.sh per seed, .venv already present)",
        "config": recipe,
        "runs": runs,
        "ratio_to_chance_range": [min(r["ratio_to_chance"] for r in runs), max(r["ratio_to_chance"] for r in runs)],
        "wall_s_range": [min(r["wall_s"] for r in runs), max(r["wall_s"] for r in runs)],
    }
    write_json_atomic(out, result)
    print("\n".join(table_rows(runs)))
    print(f"wrote {out}")
    return 0


def quickstart_recipe() -> dict:
    """The quickstart recipe's training settings that shape what the model learns."""
    from gpt4roi_sft.config import load_config

    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    t = cfg.train
    return {"recipe": "configs/quickstart.yaml", "max_steps": t.max_steps, "micro_batch_size": t.micro_batch_size,
            "processes": 2, "learning_rate": t.learning_rate, "warmup_steps": t.warmup_steps,
            "lr_scheduler": t.lr_scheduler}


if __name__ == "__main__":
    sys.exit(main())

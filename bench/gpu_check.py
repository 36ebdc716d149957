"""Run every ``gpu``-marked test and record the outcome per test, with the device and package versions.

    python bench/gpu_check.py [--out bench/results] [--timeout 240] [--workers 6] [--cpu-dry-run] [-- PYTEST_ARGS...]

Writes ``<out>/<date>_<device>_gpu_check.json``::

    {"device": "NVIDIA H100 80GB HBM3", "checks": {"test_cuda_...": "passed" | "failed" | "skipped" | "error"},
     "versions": {"torch": ..., "cuda": ..., "transformers": ..., "peft": ..., "deepspeed": ..., "bitsandbytes": ...},
     "wall_s": 187.3, "pytest_exit_code": 0, "failures": {"test_...": "first lines of the failure"}}

and prints a table. The tests are tiny models that leave most of one GPU idle, so where pytest-xdist is installed
(the GPU machine's image has it) they run in ``--workers`` processes sharing the GPU; tests that share one training
run carry the same ``xdist_group`` and stay on one worker. ``--cpu-dry-run`` runs the same tests on the CPU (GPT4ROI_GPU_TEST_DEVICE=cpu): it checks the
test code and this script, never the GPU; its JSON says ``"dry_run": true`` and is not written under bench/results
unless ``--out`` says so.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "torchvision", "transformers", "peft", "deepspeed", "bitsandbytes", "accelerate", "triton", "liger_kernel",
            "pytest", "xdist")


def versions() -> dict:
    found = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            version = getattr(importlib.import_module(name), "__version__", None)
            found[name] = version or importlib.metadata.version(name.replace("_", "-"))
        except Exception as exc:  # a broken optional install is a fact worth recording, not a crash
            found[name] = f"unavailable ({type(exc).__name__})"
    try:
        import torch

        found["cuda"] = torch.version.cuda
    except Exception:
        pass
    return found


def device_name(dry_run: bool) -> str:
    import torch

    if not dry_run and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def outcomes(junit_xml: Path) -> tuple[dict, dict]:
    """``{test name: outcome}`` and ``{test name: failure text}`` from pytest's JUnit XML."""
    checks, failures = {}, {}
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        name = case.get("name")
        if not name:  # an interrupted run records the interruption as a nameless case
            continue
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                # the message, then the end of the traceback: where it broke
                text = (child.get("message") or "")[:400] + "\n...\n" + (child.text or "")[-1600:]
                failures[name] = text
            elif child.tag == "skipped":
                outcome = "skipped"
        checks[name] = outcome
    return checks, failures


def run_interruptibly(cmd: list, env: dict, timeout: float, grace: float = 30) -> int | str:
    """Run pytest; at the time limit interrupt it as Ctrl-C would, so the tests already done still reach the report.

    A killed pytest writes no JUnit file, and one slow test would then cost the record of every other one. pytest
    runs in a session of its own, and whatever of that group is left when it ends (an xdist worker, a training it
    started) is killed, so no test outlives the check and competes with the benchmarks that follow it."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"\n== time limit ({timeout:.0f} s): interrupting the tests; the finished ones are reported", flush=True)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        return "timeout"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def slug(text: str) -> str:
    return re.sub("[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the JSON (default: bench/results; dry runs: a temp dir)")
    parser.add_argument("--timeout", type=int, default=240, help="seconds for the whole test run")
    parser.add_argument("--workers", type=int, default=6, help="pytest-xdist processes sharing the GPU (0: one process)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="run the gpu tests on the CPU (checks the tests only)")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    if args.cpu_dry_run:
        env["GPT4ROI_GPU_TEST_DEVICE"] = "cpu"
        env.setdefault("DS_ACCELERATOR", "cpu")
    else:  # tests/conftest.py defaults DeepSpeed to its CPU accelerator for the CPU suite
        env.setdefault("DS_ACCELERATOR", "cuda")
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check.")) if args.cpu_dry_run else REPO / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    junit = out_dir / ".gpu_check_junit.xml"
    parallel = []
    if args.workers > 0 and importlib.util.find_spec("xdist") is not None:
        parallel = ["-n", str(args.workers), "--dist", "loadgroup"]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rfEs", "--durations=15",
           *parallel, f"--junitxml={junit}", *args.pytest_args, str(REPO / "tests")]
    print("$", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    rc = run_interruptibly(cmd, env, args.timeout)
    wall = time.perf_counter() - start
    checks, failures = outcomes(junit) if junit.is_file() else ({}, {"pytest": "no JUnit report (timed out?)"})
    junit.unlink(missing_ok=True)
    device = device_name(args.cpu_dry_run)
    result = {"device": device, "dry_run": args.cpu_dry_run, "checks": checks, "versions": versions(),
              "wall_s": round(wall, 1), "workers": int(parallel[1]) if parallel else 1, "pytest_exit_code": rc, "failures": failures,
              "date": dt.date.today().isoformat()}
    path = out_dir / f"{result['date']}_{slug(device)}_gpu_check.json"
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    width = max([len(n) for n in checks] + [10])
    print(f"\ndevice: {device}{'  (CPU dry run: not a GPU check)' if args.cpu_dry_run else ''}  wall: {wall:.0f} s")
    for name, outcome in checks.items():
        print(f"  {name:<{width}}  {outcome}")
    print(f"wrote {path}")
    ok = rc == 0 and checks and all(v == "passed" for v in checks.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Fill ``.whl/`` with the wheels a bare GPU machine lacks, small enough to travel (64 MiB per device call).

    python bench/prepare_gpu_wheels.py --from ../shared/gpu-wheels [--liger PATH_OR_DIR] [--no-bitsandbytes]

Copies every wheel of ``--from`` into ``.whl/`` (git ignores it; the device call carries it). bitsandbytes ships one
20 MB library per CUDA release and ROCm/XPU builds besides; only the ones for the CUDA major the machine's torch
uses (``--cuda-major``, 13 by default) and the CPU library are kept, which brings its 42 MB wheel to about 3 MB.
Everything else is copied as it is. Prints the total, which must stay under the carry limit with the repository.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRY_LIMIT_MIB = 64


def slim_bitsandbytes(src: Path, dst: Path, cuda_major: int) -> None:
    """Rewrite the wheel without the native libraries of other CUDA majors, ROCm and XPU (and drop their RECORD rows)."""
    keep = re.compile(rf"libbitsandbytes_(cpu|cuda{cuda_major}\d+)\.")
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        dropped = {i.filename for i in zin.infolist()
                   if re.search(r"libbitsandbytes_\w+\.(so|dll|dylib)$", i.filename) and not keep.search(i.filename)}
        for info in zin.infolist():
            if info.filename in dropped:
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                rows = [r for r in data.decode().splitlines() if r.split(",", 1)[0] not in dropped]
                data = ("\n".join(rows) + "\n").encode()
            zout.writestr(info, data)
    if not any(keep.search(n) for n in zipfile.ZipFile(dst).namelist()):
        raise SystemExit(f"{src.name}: no libbitsandbytes_cuda{cuda_major}x library in the wheel; use --cuda-major")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", type=Path, default=REPO.parent / "shared" / "gpu-wheels")
    parser.add_argument("--out", type=Path, default=REPO / ".whl")
    parser.add_argument("--liger", type=Path, help="a liger-kernel wheel, or a folder holding one (the `gpu` extra)")
    parser.add_argument("--cuda-major", type=int, default=13, help="CUDA major of the GPU machine's torch (cu130: 13)")
    parser.add_argument("--no-bitsandbytes", action="store_true", help="leave QLoRA's library out")
    args = parser.parse_args(argv)

    wheels = sorted(args.source.glob("*.whl"))
    if args.liger:
        wheels += sorted(args.liger.glob("liger_kernel-*.whl")) if args.liger.is_dir() else [args.liger]
    if not wheels:
        raise SystemExit(f"{args.source}: no wheels there")
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.whl"):
        old.unlink()
    for wheel in wheels:
        if wheel.name.startswith("bitsandbytes-"):
            if not args.no_bitsandbytes:
                slim_bitsandbytes(wheel, args.out / wheel.name, args.cuda_major)
        else:
            shutil.copy2(wheel, args.out / wheel.name)
    total = sum(p.stat().st_size for p in args.out.glob("*.whl")) / 2**20
    for p in sorted(args.out.glob("*.whl")):
        print(f"  {p.stat().st_size / 2**20:7.1f} MiB  {p.name}")
    print(f"{total:.1f} MiB in {args.out} (the device call carries at most {CARRY_LIMIT_MIB} MiB with the repository)")
    return 0 if total < CARRY_LIMIT_MIB - 8 else 1


if __name__ == "__main__":
    sys.exit(main())

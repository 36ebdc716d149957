"""``python -m gpt4roi_sft.demo --model DIR [--adapter DIR] [--host 127.0.0.1] [--port 7860]``: region chat in a browser."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gpt4roi_sft.errors import ConfigError

logger = logging.getLogger("gpt4roi_sft.demo")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gpt4roi_sft.demo",
                                description="Serve a page where you draw boxes on an image and chat about them.")
    p.add_argument("--model", type=Path, required=True, help="model directory (gpt4roi_sft.load_model)")
    p.add_argument("--adapter", type=Path, help="LoRA adapter directory applied with peft")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port (0: any free port)")
    p.add_argument("--template", default="gpt4roi_v0", help="conversation template the model was trained with")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default and largest answer length in tokens")
    p.add_argument("--max-regions", type=int, default=15, help="most boxes per request")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 decodes greedily (GPT4RoI's demo sampled at 0.2)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="model weights' dtype; auto: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name, path in (("--model", args.model), ("--adapter", args.adapter)):
        if path is not None and not path.is_dir():
            raise ConfigError(f"{name} {path}: not a directory")
    if args.max_new_tokens < 1 or args.max_regions < 1:
        raise ConfigError("--max-new-tokens and --max-regions must be at least 1")
    import torch

    from gpt4roi_sft.conversation import TEMPLATES
    from gpt4roi_sft.demo.server import DemoSettings, make_server
    from gpt4roi_sft.infer import DecodeSettings, load_captioner

    if args.template not in TEMPLATES:
        raise ConfigError(f"--template {args.template!r}: choose one of {', '.join(TEMPLATES)}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    decode = DecodeSettings(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                            temperature=args.temperature or 1.0)
    logger.info("loading %s%s on %s (%s)", args.model,
                                     f" + adapter {args.adapter}" if args.adapter else "", device, dtype)
    captioner = load_captioner(str(args.model), args.template, decode,
                               adapter_dir=str(args.adapter) if args.adapter else None, device=device,
                               torch_dtype=getattr(torch, dtype))
    settings = DemoSettings(max_regions=args.max_regions, max_new_tokens=args.max_new_tokens,
                            model_name=args.model.name + (f" + {args.adapter.name}" if args.adapter else ""))
    server = make_server(captioner, args.host, args.port, settings)
    host, port = server.server_address[:2]
    logger.info("serving on http://%s:%d/ (Ctrl-C stops)", host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    from gpt4roi_sft.errors import run_cli

    raise SystemExit(run_cli(main))

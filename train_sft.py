"""Entry point: ``deepspeed train_sft.py --config configs/<recipe>.yaml [section.key=value ...]``.

Also runs under ``torchrun`` or plain ``python`` (one process). ``--check`` validates the recipe and exits.
All logic lives in :mod:`gpt4roi_sft.train`; this file only reads the command line and the environment.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Fine-tune a GPT4RoI-style region model with DeepSpeed.",
        epilog="Overrides: section.key=value, e.g. train.max_steps=20 lora.enabled=true. "
        "See the README's configuration table for every key.",
    )
    parser.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the launcher")
    parser.add_argument("--check", action="store_true",
                        help="validate the recipe, its files and every data record (the first ones of each file "
                             "built into training items where the model's processor reads without weights), then exit")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from gpt4roi_sft.config import load_config, validate_for_launch

    from gpt4roi_sft.train.checkpoint import check_output_dir

    cfg = load_config(args.config, args.overrides)
    validate_for_launch(cfg)
    check_output_dir(cfg)
    if args.check:
        from gpt4roi_sft.train.data_stream import check_data

        for line in check_data(cfg):
            print(line)
        print(f"config OK: {args.config or '(defaults)'}")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    local_rank = args.local_rank if args.local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
    rank = int(os.environ.get("RANK", "0"))
    if "WORLD_SIZE" not in os.environ:  # plain `python train_sft.py`: a one-process group
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
        from gpt4roi_sft.train.distributed import one_process_port

        os.environ["MASTER_PORT"] = one_process_port()
    from gpt4roi_sft.console import setup_cli_logging

    setup_cli_logging(rank, fmt=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", uses_4bit=cfg.lora.qlora)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from gpt4roi_sft.train.loop import train

    summary = train(cfg, local_rank=local_rank)
    if rank == 0:
        loss = "not logged" if summary["loss"] is None else f"{summary['loss']:.4f}"
        if summary.get("already_complete"):
            print(f"already complete: step {summary['step']}, last logged loss {loss}; outputs in {summary['output_dir']} "
                  f"(raise train.max_steps to train further)")
        else:
            print(f"done: step {summary['step']}, loss {loss}, outputs in {summary['output_dir']}")
    return 0


if __name__ == "__main__":
    from gpt4roi_sft.errors import run_cli

    sys.exit(run_cli(main))

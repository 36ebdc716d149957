"""The tiny model for the synthetic Pix2Cap data: ``python -m quickstart.tiny_model --out DIR [--seed 0]``.

The factory is :mod:`gpt4roi_sft.model.tiny` (the library knows nothing of the synthetic data); this entry gives it the synthetic generator's caption corpus
(every word its captions, GPT4RoI's region-caption templates and the VG evaluation question can hold), so the
tokenizer of the model the tests, the benchmarks and the quickstart use covers their data.
"""

from __future__ import annotations

import argparse
import logging
from typing import List

from data_converters.synthetic import caption_corpus
from gpt4roi_sft.model import tiny


def tiny_tokenizer_corpus() -> List[str]:
    """The tiny tokenizer's training texts for the synthetic data."""
    return tiny.tiny_tokenizer_corpus(caption_corpus())


def build_tiny_model(out_dir, seed: int = 0, **config_overrides) -> str:
    """:func:`gpt4roi_sft.model.tiny.build_tiny_model` with the synthetic caption corpus; returns the directory."""
    return tiny.build_tiny_model(out_dir, caption_corpus(), seed=seed, **config_overrides)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quickstart.tiny_model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build_tiny_model(args.out, seed=args.seed)
    return 0


if __name__ == "__main__":
    from gpt4roi_sft.errors import run_cli

    raise SystemExit(run_cli(main))

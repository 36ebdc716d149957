"""Convert a merged GPT4RoI (or original-LLaVA) checkpoint into this project's own model directory.

``python -m gpt4roi_sft.model.convert_gpt4roi --checkpoint DIR --vision-tower CLIP_DIR --out OUT [--dtype float16]``
opens ``DIR`` with :func:`gpt4roi_sft.model.loading.load_model` (whose key maps are
:mod:`gpt4roi_sft.model.checkpoint_keys`) and writes the model and its processor to ``OUT``, in ``--dtype``
(default float32; GPT4RoI's releases are float16). A GPT4RoI checkpoint keeps GPT4RoI's layout (its processor
reads the ``gpt4roi_original`` template).
"""

from __future__ import annotations

import argparse

from gpt4roi_sft.atomic import apply_default_modes_under
from gpt4roi_sft.model.loading import load_model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt4roi_sft.model.convert_gpt4roi", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="merged GPT4RoI (or original LLaVA) directory")
    parser.add_argument("--vision-tower", default=None, help="CLIP directory (default: the config's mm_vision_tower)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the written weights (default float32)")
    args = parser.parse_args(argv)
    import torch

    model, processor = load_model(args.checkpoint, vision_tower=args.vision_tower, torch_dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    apply_default_modes_under(args.out)  # save_pretrained leaves model.safetensors 0600
    return 0


if __name__ == "__main__":
    from gpt4roi_sft.errors import run_cli

    raise SystemExit(run_cli(main))

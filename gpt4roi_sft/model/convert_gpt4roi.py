"""Convert a merged GPT4RoI (or original-LLaVA) checkpoint into this project's own model directory.

``python -m gpt4roi_sft.model.convert_gpt4roi --checkpoint DIR --vision-tower CLIP_DIR --out OUT`` opens ``DIR``
with :func:`gpt4roi_sft.model.loading.load_model` (whose key maps are :mod:`gpt4roi_sft.model.checkpoint_keys`)
and writes the model and its processor to ``OUT``.
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
    args = parser.parse_args(argv)
    model, processor = load_model(args.checkpoint, vision_tower=args.vision_tower)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    apply_default_modes_under(args.out)  # save_pretrained leaves model.safetensors 0600
    return 0


if __name__ == "__main__":
    from gpt4roi_sft.errors import run_cli

    raise SystemExit(run_cli(main))

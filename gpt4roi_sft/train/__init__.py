"""The DeepSpeed training recipe: modes (freeze presets, LoRA/QLoRA), checkpoints, logging and the loop."""

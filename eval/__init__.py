"""Evaluation harnesses: VG region captioning (`eval.vg`), caption metrics (`eval.caption_metrics`) and
ViP-Bench (`eval.vipbench`) with its LLM judge (`eval.judge`). What harnesses share (model and decoding
options, shards, the resumable prediction store) is `eval.harness` and `eval.prediction_store`."""

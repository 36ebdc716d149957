"""Evaluation harnesses: VG region captioning (`eval.vg`), caption metrics (`eval.caption_metrics`),
ViP-Bench (`eval.vipbench`) with its LLM judge (`eval.judge`), and Pix2Cap's panoptic segmentation-captioning
benchmark (`eval.segcap`, predictions by `eval.segcap_predict`). What harnesses share (model and decoding
options, shards, the resumable prediction store) is `eval.harness` and `eval.prediction_store`."""

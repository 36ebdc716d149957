"""Evaluation harnesses: VG region captioning (`eval.vg`), caption metrics (`eval.caption_metrics`),
ViP-Bench (`eval.vipbench`) with its LLM judge (`eval.judge`) and an offline fixture (`eval.vipbench_fixture`),
and Pix2Cap's panoptic segmentation-captioning benchmark (`eval.segcap`, predictions by `eval.segcap_predict`)."""

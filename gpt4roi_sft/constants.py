"""Token strings and fixed values shared by the data pipeline, the model and the evaluators."""

IMAGE_TOKEN = "<image>"
BBOX_TOKEN = "<bbox>"
IGNORE_INDEX = -100

# GPT4RoI's image preamble; the first human turn of region dialogues starts with it.
GPT4ROI_PREAMBLE = "The <image> provides an overview of the picture.\n"

# The single question of the VG region-captioning test protocol (GLaMM / Pix2Cap evaluate_VG).
VG_EVAL_QUESTION = "Can you give a description of the region mentioned by region1 <bbox>?"

# CLIP's normalisation constants (openai/clip-vit-large-patch14 preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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

# GPT4RoI's released checkpoints (LLaVA v0 with mm_use_im_start_end): an image is written as <im_start>, one
# <im_patch> per ViT-L/14 patch at 224 px (16 x 16) and <im_end>. Their tokenizer adds six tokens to LLaMA's
# 32000, in this order (gpt4roi/train/train.py, gpt4roi/models/spi_llava.py), giving ids 32000..32005.
IM_START_TOKEN = "<im_start>"
IM_END_TOKEN = "<im_end>"
IM_PATCH_TOKEN = "<im_patch>"
GPT4ROI_NUM_PATCHES = 256
GPT4ROI_PAD_TOKEN = "[PAD]"
GPT4ROI_ADDED_TOKENS = (GPT4ROI_PAD_TOKEN, IM_PATCH_TOKEN, BBOX_TOKEN, "<point>", IM_START_TOKEN, IM_END_TOKEN)

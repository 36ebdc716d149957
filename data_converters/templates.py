"""Region-caption question templates.

``GPT4ROI_VG`` is GPT4RoI's ``FINAL_QUESTIONS`` list (jshilong/GPT4RoI, gpt4roi/datasets/vg.py), kept
verbatim and in order: ten base questions followed by ten variants ending in ", please" (one in
", exactly"). ``<spi_descript>`` is replaced by ``region{i} <bbox>``.
"""

from __future__ import annotations

REGION_PLACEHOLDER = "<spi_descript>"

GPT4ROI_VG: tuple[str, ...] = (
    "Can you provide me with a detailed description of the region in the picture marked by <spi_descript>?",
    "I'm curious about the region represented by <spi_descript> in the picture. Could you describe it in detail?",
    "What can you tell me about the region indicated by <spi_descript> in the image?",
    "I'd like to know more about the area in the photo labeled <spi_descript>. Can you give me a detailed description?",
    "Could you describe the region shown as <spi_descript> in the picture in great detail?",
    "What details can you give me about the region outlined by <spi_descript> in the photo?",
    "Please provide me with a comprehensive description of the region marked with <spi_descript> in the image.",
    "Can you give me a detailed account of the region labeled as <spi_descript> in the picture?",
    "I'm interested in learning more about the region represented by <spi_descript> in the photo. Can you describe it in detail?",
    "What is the region outlined by <spi_descript> in the picture like? Could you give me a detailed description?",
    "Can you provide me with a detailed description of the region in the picture marked by <spi_descript>, please?",
    "I'm curious about the region represented by <spi_descript> in the picture. Could you describe it in detail, please?",
    "What can you tell me about the region indicated by <spi_descript> in the image, exactly?",
    "I'd like to know more about the area in the photo labeled <spi_descript>, please. Can you give me a detailed description?",
    "Could you describe the region shown as <spi_descript> in the picture in great detail, please?",
    "What details can you give me about the region outlined by <spi_descript> in the photo, please?",
    "Please provide me with a comprehensive description of the region marked with <spi_descript> in the image, please.",
    "Can you give me a detailed account of the region labeled as <spi_descript> in the picture, please?",
    "I'm interested in learning more about the region represented by <spi_descript> in the photo. Can you describe it in detail, please?",
    "What is the region outlined by <spi_descript> in the picture like, please? Could you give me a detailed description?",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"gpt4roi_vg": GPT4ROI_VG}


def region_question(template: str, index: int) -> str:
    """Fill ``template`` for the ``index``-th region (1-based): ``<spi_descript>`` -> ``region{index} <bbox>``."""
    return template.strip().replace(REGION_PLACEHOLDER, f"region{index} <bbox>")

"""Question templates of GPT4RoI's training sets (jshilong/GPT4RoI, gpt4roi/datasets/), kept verbatim and in order.

``GPT4ROI_VG`` is ``vg.py``'s ``FINAL_QUESTIONS`` (also RefCOCOg's and Pix2Cap's): ten base questions followed
by ten variants ending in ", please" (one in ", exactly"); ``<spi_descript>`` is replaced by ``region{i} <bbox>``.
``FLICKR_ALL_REGIONS`` / ``FLICKR_ONE_REGION`` are ``flickr30k.py``'s ``FINAL_QUESTIONS`` (``<spi_descript>`` ->
``region1 <bbox>,region2 <bbox>,...,``) and ``REGION_QUESTIONS`` (``<spi_descript>`` -> ``region {i}``, with the
space GPT4RoI writes). ``VCR_WHY`` and ``VCR_REFERENCE`` are ``vcr.py``'s ``WHY_QUESTIONS`` and ``Ref_WAY``
(``<spi>`` -> ``region1 <bbox>,...,regionN <bbox>``).
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

# The first human turn of a Flickr30k entities dialogue (asks for the whole caption).
FLICKR_ALL_REGIONS: tuple[str, ...] = (
    "Could you please give me a detailed description of these areas <spi_descript>?",
    "Can you provide a thorough description of the regions <spi_descript> in this image?",
    "Please describe in detail the contents of the boxed areas <spi_descript>.",
    "Could you give a comprehensive explanation of what can be found within <spi_descript> in the picture?",
    "Could you give me an elaborate explanation of the <spi_descript> regions in this picture?",
    "Can you provide a comprehensive description of the areas identified by <spi_descript> in this photo?",
    "Help me understand the specific locations labeled <spi_descript> in this picture in detail, please.",
    "What is the detailed information about the areas marked by <spi_descript> in this image?",
    "Could you provide me with a detailed analysis of the regions designated <spi_descript> in this photo?",
    "What are the specific features of the areas marked <spi_descript> in this picture that you can describe in detail?",
    "Could you elaborate on the regions identified by <spi_descript> in this image?",
    "What can you tell me about the areas labeled <spi_descript> in this picture?",
    "Can you provide a thorough analysis of the specific locations designated <spi_descript> in this photo?",
    "I am interested in learning more about the regions marked <spi_descript> in this image. Can you provide me with more information?",
    "Could you please provide a detailed description of the areas identified by <spi_descript> in this photo?",
    "What is the significance of the regions labeled <spi_descript> in this picture?",
    "I would like to know more about the specific locations designated <spi_descript> in this image. Can you provide me with more information?",
    "Can you provide a detailed breakdown of the regions marked <spi_descript> in this photo?",
    "What specific features can you tell me about the areas identified by <spi_descript> in this picture?",
    "Could you please provide a comprehensive explanation of the locations labeled <spi_descript> in this image?",
    "Can you provide a detailed account of the regions designated <spi_descript> in this photo?",
    "I am curious about the areas marked <spi_descript> in this picture. Can you provide me with a detailed analysis?",
    "What important details can you tell me about the specific locations identified by <spi_descript> in this image?",
    "Could you please provide a detailed description of the regions labeled <spi_descript> in this photo?",
    "What can you tell me about the features of the areas designated <spi_descript> in this picture?",
    "Can you provide a comprehensive overview of the regions marked <spi_descript> in this image?",
    "I would like to know more about the specific locations identified by <spi_descript> in this photo. Can you provide me with more information?",
    "What is the detailed information you have on the areas labeled <spi_descript> in this picture?",
    "Could you provide me with a thorough analysis of the regions designated <spi_descript> in this image?",
    "Can you provide a detailed explanation of the specific locations marked by <spi_descript> in this photo?",
)

# Each following turn: which phrase of the caption a region is.
FLICKR_ONE_REGION: tuple[str, ...] = (
    "Which part of your overall description corresponds to the specific area of the image <spi_descript> you are referring to?",
    "In your initial description, which part corresponds to the particular area of the image <spi_descript> you are indicating?",
    "Can you specify which aspect of your overall description corresponds to the particular section of the image <spi_descript> you are pointing to?",
    "Which specific details from your overall description correspond to the particular area of the image <spi_descript> you are identifying?",
    "From your initial description, which parts specifically match the area of the image <spi_descript> you are referring to?",
    "Could you indicate which elements from your overall description relate to the particular section of the image <spi_descript> you are highlighting?",
    "Which aspects of your description correspond to the specific area of the image <spi_descript> you are referencing?",
    "Can you point out the specific parts of your description that correspond to the area of the image <spi_descript> you are focusing on?",
    "In your description, which details correspond to the specific portion of the image <spi_descript> you are indicating?",
    "Could you identify the specific parts of your description that match the section of the image <spi_descript> you are referring to?",
)

# The second question of a VCR dialogue (the rationale).
VCR_WHY: tuple[str, ...] = (
    "why?",
    "why",
    "What's the rationale for your decision?",
    "What led you to that conclusion?",
    "What's the reasoning behind your opinion?",
    "Why do you believe that to be true?",
    "Can you explain the basis for your thinking?",
    "What factors influenced your perspective?",
    "How did you arrive at that perspective?",
    "What evidence supports your viewpoint?",
    "What makes you think that way?",
    "What's the logic behind your argument?",
    "Can you provide some context for your opinion?",
    "What's the basis for your assertion?",
    "Why do you hold that belief?",
    "What experiences have shaped your perspective?",
    "What assumptions underlie your reasoning?",
    "What's the foundation of your assertion?",
    "What's the source of your reasoning?",
    "What's the motivation behind your decision?",
    "What's the impetus for your belief?",
    "What's the driving force behind your conclusion?",
    "Why do you think that?",
    "What's your reasoning?",
    "What makes you say that?",
    "Why do you feel that way?",
    "What's the story behind that?",
    "What's your thought process?",
    "What's the deal with that?",
    "What's the logic behind it?",
    "Why do you believe that?",
    "What's the real deal here?",
    "What's the reason behind it?",
    "What's the thought process behind your decision?",
    "What's the rationale for your opinion?",
    "Why do you have that impression?",
    "What's the background to that?",
    "What's the evidence that supports your view?",
    "What's the explanation for that?",
)

# How the full VCR variant lists every object's box before the question.
VCR_REFERENCE: tuple[str, ...] = (
    "There are <spi> in the image,",
    "There are <spi>,",
    "Given <spi>,",
    "Given <spi> in the image,",
    "<spi>,",
    "<spi> in the given image,",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {"gpt4roi_vg": GPT4ROI_VG}


def region_question(template: str, index: int) -> str:
    """Fill ``template`` for the ``index``-th region (1-based): ``<spi_descript>`` -> ``region{index} <bbox>``."""
    return template.strip().replace(REGION_PLACEHOLDER, f"region{index} <bbox>")

"""The instructions sent with each Set-of-Mark image, and the strict parser of the reply.

Pix2Cap-COCO's own prompt was never published; the paper says GPT-4V wrote one instance-specific
description per numbered mark, covering appearance, interactions and relative position, in a fixed
output format, averaging about 23 words. ``PROMPT_TEMPLATE`` asks for exactly that, in our words.

Reply format: one line per region, ``<number>: <description>``. The parser is strict about what it
accepts and tolerant only of decoration models add anyway (a list dash, ``**bold**`` numbers, a code fence,
a ``<think>`` block): a number given twice, a number that was not drawn, an empty or placeholder text, or
a line in another shape never becomes a description. What is missing is asked again once (``reask_text``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

PROMPT_TEMPLATE = """\
The image has {count} numbered regions. Each region is outlined in a colour, and its number is written in a \
small box of the same colour, inside the region or, for a small region, right next to it.

For every number from 1 to {count}, write one description of that region alone, in {language}, of 20 to 30 \
words. Make it specific to that instance, so that it tells the region apart from similar ones in the picture:
- what it is and how it looks: colour, material, shape, size, texture, state, pose or action;
- what it is doing or interacting with, if anything;
- where it is, in the picture and relative to the objects around it.
Describe what is really there under the outline. Never mention the outlines, the boxes or the numbers. If a \
region covers several objects (a crowd, a row of trees) or a background area (sky, road, wall), describe it \
as a whole.
{hints}
Answer with exactly {count} lines, in order from 1 to {count}, each of the form `<number>: <description>`, \
and nothing else."""

HINTS_INTRO = ("The segmentation labelled the regions as follows; use these names as hints, they can be coarse "
               "or wrong: ")

REASK_TEMPLATE = """\
Your answer did not give a usable description for {which}. Write {them} now, following the same \
instructions: one line per region, of the form `<number>: <description>`, and nothing else."""

# What a model writes when it has nothing to say; never kept as a description.
PLACEHOLDERS = frozenset({"n/a", "na", "none", "unknown", "not visible", "no description", "nothing", "-", "..."})
MIN_CHARS = 3  # Pix2Cap's loader drops training images with any description shorter than this

_LINE = re.compile(r"^(?:[-*]\s+)?(?:\*\*)?(\d{1,4})(?:\*\*)?\s*:\s*(?:\*\*)?\s*(.*?)\s*$")
_THINK = re.compile(r"<think>.*?</think>", re.S | re.I)


def category_hint(name: str) -> str:
    """COCO-panoptic class names as words: ``sky-other-merged`` -> ``sky``, ``wall-brick`` -> ``wall brick``."""
    words = [w for w in re.split(r"[-_]", name) if w and w not in ("merged", "other", "stuff")]
    return " ".join(words) or name


def prompt_text(count: int, hints: Sequence[str] | None = None, language: str = "English",
                template: str = PROMPT_TEMPLATE) -> str:
    """The user text for ``count`` marks; ``hints[i]`` is the class name of mark ``i + 1`` (or ``None``).

    ``template`` may use ``{count}``, ``{language}`` and ``{hints}`` (an empty line when there are none).
    """
    hint_line = ""
    if hints:
        hint_line = "\n" + HINTS_INTRO + "; ".join(f"{i} {h}" for i, h in enumerate(hints, start=1)) + ".\n"
    return template.format(count=count, language=language, hints=hint_line)


def reask_text(numbers: Iterable[int]) -> str:
    """The follow-up turn asking again for just ``numbers``."""
    numbers = sorted(numbers)
    if len(numbers) == 1:
        which, them = f"region {numbers[0]}", "it"
    else:
        which, them = "regions " + ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}", "them"
    return REASK_TEMPLATE.format(which=which, them=them)


@dataclass
class ParsedReply:
    """``descriptions[n]`` for every number answered well; ``missing`` the expected numbers that were not."""

    descriptions: dict[int, str]
    missing: list[int]
    problems: list[str] = field(default_factory=list)


def _clean(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def parse_reply(text: str, expected: Iterable[int], truncated: bool = False) -> ParsedReply:
    """Parse ``<number>: <description>`` lines; keep only numbers in ``expected`` given exactly once, well.

    ``truncated``: the reply was cut at the token limit, so its last numbered line is not trusted.
    """
    expected = set(expected)
    text = _THINK.sub("", text or "")
    found: dict[int, list[str]] = {}
    stray = 0
    last = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("```"):
            continue
        m = _LINE.match(line)
        if not m:
            stray += 1
            continue
        last = int(m.group(1))
        found.setdefault(last, []).append(_clean(m.group(2)))
    descriptions: dict[int, str] = {}
    problems: list[str] = []
    for number in sorted(found):
        texts = found[number]
        if number not in expected:
            problems.append(f"number {number} was not asked for")
        elif len(texts) > 1:
            problems.append(f"number {number} given {len(texts)} times")
        elif len(texts[0]) < MIN_CHARS or texts[0].lower().strip(" .!") in PLACEHOLDERS:
            problems.append(f"number {number} has no usable text ({texts[0]!r})")
        else:
            descriptions[number] = texts[0]
    if truncated and last in descriptions:
        del descriptions[last]
        problems.append(f"reply cut off at the token limit; number {last} not trusted")
    if stray:
        problems.append(f"{stray} line{'s' if stray > 1 else ''} not of the form `<number>: <description>`")
    missing = sorted(expected - set(descriptions))
    return ParsedReply(descriptions, missing, problems)


def merge_replies(first: ParsedReply, second: ParsedReply) -> ParsedReply:
    """The first reply's descriptions completed by the re-ask's (which only answers ``first.missing``)."""
    descriptions: Mapping[int, str] = {**first.descriptions, **second.descriptions}
    missing = [n for n in first.missing if n not in second.descriptions]
    return ParsedReply(dict(descriptions), missing, first.problems + second.problems)

"""Prompts: what a user types to ask for classes ("3 1 4", "Seven, nine", "bag, ankle
boot") → class indices; and the class names of each dataset, for messages and figures.

A prompt is a list of class references separated by spaces or commas; each is the class
index ("7") or its name ("seven"), in any case. Names may hold spaces (Fashion-MNIST's
"ankle boot"): the parser takes the longest name that matches at each position.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from ddpm_core.errors import DDPMError

CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "fashion-mnist": (
        "t-shirt/top",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle boot",
    ),
}

# Other spellings people type, each unambiguous: accepted in prompts, not listed in messages.
ALIASES: dict[str, dict[str, int]] = {
    "mnist": {},
    "fashion-mnist": {"t-shirt": 0, "tshirt": 0, "t shirt": 0, "top": 0, "trousers": 1, "ankle-boot": 9, "boot": 9},
}


class PromptError(DDPMError):
    """A prompt names no class of the dataset."""

    exit_code = 2


def class_labels(dataset: str) -> list[str]:
    """How figures and tables name the classes: digits for MNIST, names otherwise."""
    if dataset == "mnist":
        return [str(i) for i in range(len(CLASS_NAMES[dataset]))]
    return list(CLASS_NAMES[dataset])


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[\s,]+", text.strip().lower()) if w]


def accepted(names: Sequence[str]) -> str:
    """The accepted forms, for messages: '0-9 or zero, one, …, nine'."""
    return f"0-{len(names) - 1} or {', '.join(names)}"


def parse_prompt(
    prompt: str, names: Sequence[str] = CLASS_NAMES["mnist"], aliases: Mapping[str, int] = {}
) -> list[int]:
    """Class indices in the order asked: "3 one, Four" → [3, 1, 4]; repeats are kept."""
    table = {tuple(_words(name)): index for name, index in aliases.items()}
    table.update({tuple(_words(name)): index for index, name in enumerate(names)})
    longest = max(len(key) for key in table)
    words = _words(prompt)
    if not words:
        raise PromptError(f"empty prompt; give classes as {accepted(names)}")
    classes, i = [], 0
    while i < len(words):
        for size in range(min(longest, len(words) - i), 0, -1):
            if tuple(words[i : i + size]) in table:
                classes.append(table[tuple(words[i : i + size])])
                i += size
                break
        else:
            word = words[i]
            if not (word.isascii() and word.isdigit() and int(word) < len(names)):
                raise PromptError(f"unknown class {word!r}; accepted: {accepted(names)}")
            classes.append(int(word))
            i += 1
    return classes


def parse_dataset_prompt(prompt: str, dataset: str) -> list[int]:
    """`parse_prompt` with the names and aliases of `dataset` ("mnist", "fashion-mnist")."""
    return parse_prompt(prompt, CLASS_NAMES[dataset], ALIASES[dataset])

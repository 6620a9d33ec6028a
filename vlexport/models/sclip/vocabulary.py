"""SCLIP vocabularies: class lines with synonyms, the `--classes` option, the template set's id."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from vlexport.errors import UsageError
from vlexport.models.clip.text import IMAGENET_TEMPLATES, SINGLE_TEMPLATE

__all__ = ["SYNONYM_SEPARATOR", "CLASS_OPTION_SYNONYM", "split_synonyms", "classes_from_option"]

#: A class line with synonyms: ``"sky, wall, tree"`` (exactly comma + space, as SCLIP's class files).
SYNONYM_SEPARATOR = ", "

#: Between the synonyms of one class in `vlexport sclip --classes` (``"road|street,car"``), where
#: ``","`` already separates the classes.
CLASS_OPTION_SYNONYM = "|"


def split_synonyms(class_lines: Sequence[str]) -> tuple[list[str], list[int]]:
    """``["sky, wall", "cat"]`` -> queries ``["sky", "wall", "cat"]`` and query->class ``[0, 0, 1]``."""
    if isinstance(class_lines, str):
        raise UsageError("class names must be a list of strings, not one string")
    queries: list[str] = []
    owner: list[int] = []
    for index, line in enumerate(class_lines):
        names = [name.strip() for name in str(line).split(SYNONYM_SEPARATOR)]
        names = [name for name in names if name]
        if not names:
            raise UsageError(f"class {index} of the vocabulary is empty; give every class a name")
        queries.extend(names)
        owner.extend([index] * len(names))
    if not queries:
        raise UsageError('the vocabulary is empty: pass class names such as ["person", "car"]')
    return queries, owner


def classes_from_option(value: str) -> list[str]:
    """``--classes`` of `vlexport sclip`: classes separated by ``","``, synonyms of one class by ``"|"``.

    ``"background|sky|wall,cat,dog"`` -> ``["background, sky, wall", "cat", "dog"]``: the class
    lines a ``--vocab`` file with those lines gives (synonyms joined by :data:`SYNONYM_SEPARATOR`),
    so each synonym becomes its own query of that class. Names are stripped; empty ones are
    skipped (as ``parse_vocabulary`` does); a name may appear only once in the whole value.
    """
    lines: list[str] = []
    seen: list[str] = []
    for item in str(value).split(","):
        names = [name.strip() for name in item.split(CLASS_OPTION_SYNONYM)]
        names = [name for name in names if name]
        if names:
            lines.append(SYNONYM_SEPARATOR.join(names))
            seen.extend(names)
    if not lines:
        raise UsageError('the vocabulary is empty: pass --classes "sky|clouds,tree,person" (classes separated by ",", '
                         'synonyms of one class by "|") or --vocab FILE')
    duplicates = sorted({name for name in seen if seen.count(name) > 1})
    if duplicates:
        raise UsageError(f"--classes names {', '.join(map(repr, duplicates))} more than once; list each name once")
    return lines


def _templates_id(templates: Sequence[str]) -> str:
    templates = tuple(templates)
    if templates == IMAGENET_TEMPLATES:
        return "imagenet80"
    if templates == SINGLE_TEMPLATE:
        return "single"
    return "file:" + hashlib.sha256("\n".join(templates).encode("utf-8")).hexdigest()[:16]

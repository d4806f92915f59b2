"""The run's prompts: a JSONL file, one object per line, with ``prompt`` and reference fields.

Every other field of a line is passed to the verifiers as the reference (as strings), e.g.
``{"prompt": "12+30=", "answer": "42"}``. A bad line is refused with its line number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class DatasetError(ValueError):
    """The dataset file is missing or malformed; the message names the line and field."""


@dataclass(frozen=True)
class Prompt:
    text: str
    reference: dict[str, str]  # every field but "prompt", as strings


def _parse(line: str, number: int) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise DatasetError(f"line {number}: not JSON ({err.msg})") from err
    if not isinstance(row, dict):
        raise DatasetError(f"line {number}: expected an object")
    prompt = row.pop("prompt", None)
    if not isinstance(prompt, str) or not prompt:
        raise DatasetError(f"line {number}.prompt: a non-empty string is required")
    reference = {k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()}
    return Prompt(prompt, reference)


def load_dataset(path: Path) -> list[Prompt]:
    if not path.is_file():
        raise DatasetError(f"dataset: {path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts = [_parse(line, i) for i, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise DatasetError(f"dataset: {path} has no prompts")
    return prompts


def require_reference(prompts: list[Prompt], field: str) -> None:
    """Every prompt has a non-empty ``field``: the reference responses of sampling.on_policy_fraction.

    Checked when the run is loaded, so that a missing reference stops the worker before any
    prompt is leased instead of failing one group at a time.
    """
    for index, prompt in enumerate(prompts):
        if not prompt.reference.get(field, "").strip():
            raise DatasetError(
                f"prompt {index}.{field}: sampling.reference_field names it, a non-empty text is required"
            )

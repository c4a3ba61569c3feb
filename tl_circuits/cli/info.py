"""``tl-circuits info``: what the embedded default model contains."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "info",
        help="the embedded default model: architecture, circuits, accuracies, prompts",
        description="Describe the embedded default model (its card) and the prompts that "
        "show its circuits.",
    )
    p.add_argument("--json", action="store_true", help="print the whole card as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from tl_circuits.default import DEFAULT_PROMPTS, default_card

    card = default_card()
    if args.json:
        print(json.dumps(card, indent=1))
        return 0
    print(_summary(card))
    print("prompts (tl-circuits trace --example NAME):")
    for prompt in DEFAULT_PROMPTS.values():
        print(f"  {prompt.name}: {prompt.text!r} -> {prompt.answer!r}")
        print(f"      {prompt.description}")
    return 0


def _summary(card: dict[str, Any]) -> str:
    lines = []
    for key, value in card.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            lines += [f"  {k}: {_short(v)}" for k, v in value.items()]
        else:
            lines.append(f"{key}: {_short(value)}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 160 else text[:157] + "..."

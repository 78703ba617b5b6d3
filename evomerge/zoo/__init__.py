"""The demo zoo: a tiny Llama-style base and specialists fine-tuned from it, built on CPU in minutes."""
from __future__ import annotations

from evomerge.zoo.skills import SKILLS, Example, Skill

__all__ = ["SKILLS", "Example", "Skill"]

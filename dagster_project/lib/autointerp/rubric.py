"""Behaviour rubrics (``dagster_project/rubrics/<name>.yaml``): their patterns, scoring guide, categories
and themes, loaded and checked, and the fixed text block the classify prompts embed."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from dagster_project.lib.autointerp.windows import PromptError

RUBRICS_DIR = Path(__file__).resolve().parent.parent.parent / "rubrics"
DEFAULT_RUBRIC = "alignment_faking_v1"


@dataclass(frozen=True)
class RubricPattern:
    id: str
    name: str
    description: str
    keywords: tuple[str, ...]

    def text(self) -> str:
        """The text embedded for similarity: name, description and keywords."""
        return f"{self.name}. {self.description} Keywords: {', '.join(self.keywords)}."


@dataclass(frozen=True)
class Rubric:
    """A behaviour rubric loaded from ``rubrics/<name>.yaml`` (see the file for the fields)."""

    version: str
    behaviour_name: str
    behaviour_definition: str
    patterns: tuple[RubricPattern, ...]
    scoring_guide: tuple[tuple[int, int, str], ...]
    categories: dict[str, dict[str, Any]]
    themes: tuple[str, ...]
    offline: dict[str, float]

    @property
    def relevant_min(self) -> int:
        """Lowest score a ``known`` / ``discovery`` reply may carry."""
        return int(self.categories["known"].get("min_score", 4))

    @property
    def unrelated_max(self) -> int:
        """Highest score an ``unrelated`` reply may carry."""
        return int(self.categories["unrelated"].get("max_score", self.relevant_min - 1))

    def prompt_block(self) -> str:
        """The rubric as the fixed text block of the classify prompts (identical for every call)."""
        lines = [
            f"RUBRIC {self.version}",
            f"Behaviour: {self.behaviour_name}.",
            f"Definition: {self.behaviour_definition}",
            "",
            "Known patterns (id: description; keywords):",
        ]
        for p in self.patterns:
            lines.append(f"- {p.id}: {p.description} Keywords: {', '.join(p.keywords)}.")
        lines += ["", "Scoring guide (0-10):"]
        for lo, hi, meaning in self.scoring_guide:
            span = f"{lo}" if lo == hi else f"{lo}-{hi}"
            lines.append(f"- {span}: {meaning}")
        lines += ["", "Categories:"]
        for name, spec in self.categories.items():
            lines.append(f"- {name}: {spec['definition']}")
        lines += ["", f"Theme list: {', '.join(self.themes)}.", f"END RUBRIC {self.version}"]
        return "\n".join(lines)


def rubric_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in {".yaml", ".yml"}:
        return p
    return RUBRICS_DIR / f"{name_or_path}.yaml"


@cache
def _load_rubric_cached(path: Path) -> Rubric:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise PromptError(f"rubric file not found: {path}") from e
    try:
        patterns = tuple(
            RubricPattern(
                id=str(p["id"]),
                name=str(p["name"]),
                description=" ".join(str(p["description"]).split()),
                keywords=tuple(str(k) for k in p["keywords"]),
            )
            for p in raw["patterns"]
        )
        guide = tuple(
            (int(g["range"][0]), int(g["range"][1]), " ".join(str(g["meaning"]).split()))
            for g in raw["scoring_guide"]
        )
        categories = {
            str(k): {**v, "definition": " ".join(str(v["definition"]).split())}
            for k, v in raw["categories"].items()
        }
        rubric = Rubric(
            version=str(raw["version"]),
            behaviour_name=str(raw["behaviour"]["name"]),
            behaviour_definition=" ".join(str(raw["behaviour"]["definition"]).split()),
            patterns=patterns,
            scoring_guide=guide,
            categories=categories,
            themes=tuple(str(t) for t in raw["themes"]),
            offline={str(k): float(v) for k, v in raw.get("offline_classifier", {}).items()},
        )
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise PromptError(f"rubric {path} is malformed: {e!r}") from e
    if set(categories) != {"known", "discovery", "unrelated"}:
        raise PromptError(
            f"rubric {path}: categories must be known, discovery, unrelated; got {sorted(categories)}"
        )
    if not patterns:
        raise PromptError(f"rubric {path}: no patterns")
    return rubric


def load_rubric(name_or_path: str | Path = DEFAULT_RUBRIC) -> Rubric:
    """Load a rubric by name (``rubrics/<name>.yaml``) or path."""
    return _load_rubric_cached(rubric_path(name_or_path).resolve())

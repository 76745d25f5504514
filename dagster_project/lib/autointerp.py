"""Differential autointerp: data types, prompt building, reply validation, records.

A selected SAE feature comes in as a :class:`FeatureExamples`: the windows where it fires most
strongly (``top``), matched windows where it does not (``negatives``) and held-out windows for
detection scoring (``holdout`` activating, ``holdout_negatives`` not). From them this module builds
versioned prompts (templates in ``dagster_project/prompts``), validates the JSON replies against a
strict schema and defines the records the pipeline stores. Calling a model is
:mod:`dagster_project.lib.describers`' job.

Trace text is untrusted. It only ever appears inside ``⟦NAME⟧ ... ⟦END NAME⟧`` data blocks, and
:func:`neutralize` removes the block brackets from it and turns ``<``/``>`` into ``‹``/``›``, so a
trace can neither close its block nor fake a ``<<highlight>>``. The instructions tell the model that
block contents are data. A reply that does not fit its schema raises :class:`ReplyParseError`: the
caller retries and finally records ``failed``, never a made-up value.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

PACKAGE_DIR = Path(__file__).resolve().parent.parent
PROMPTS_DIR = PACKAGE_DIR / "prompts"
RUBRICS_DIR = PACKAGE_DIR / "rubrics"

DEFAULT_PROMPT_VERSION = "v1"
DEFAULT_RUBRIC = "alignment_faking_v1"

Status = Literal["ok", "failed"]
Category = Literal["known", "discovery", "unrelated"]

MAX_DESCRIPTION_CHARS = 400
MAX_THEMES = 5
MAX_THEME_CHARS = 40
MAX_TOKEN_CHARS = 100

_BLOCK_OPEN = "⟦"
_BLOCK_CLOSE = "⟧"
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class ReplyParseError(ValueError):
    """A model reply is not one JSON object of the expected schema."""


class PromptError(ValueError):
    """A prompt template or rubric is missing or malformed, or examples are unusable."""


# --------------------------------------------------------------------------------------------
# Data types
# --------------------------------------------------------------------------------------------


@dataclass
class Window:
    """A window of a sample's tokens with one feature's activation on each token.

    ``peak`` indexes the strongest token and ``max_act`` is its activation. ``label`` and
    ``is_positive`` are the sample's dataset label; they are provenance only and never shown to the
    describer (which must describe what the feature fires on, not guess labels).
    """

    dataset: str
    sample_id: int
    label: str
    is_positive: bool
    tokens: list[str]
    acts: list[float]
    peak: int
    max_act: float

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.acts):
            raise PromptError(
                f"window {self.ref}: {len(self.tokens)} tokens but {len(self.acts)} activations"
            )
        if not self.tokens:
            raise PromptError(f"window {self.ref}: no tokens")
        if not 0 <= self.peak < len(self.tokens):
            raise PromptError(f"window {self.ref}: peak={self.peak} outside 0..{len(self.tokens) - 1}")

    @property
    def ref(self) -> str:
        """Provenance id ``dataset:sample_id``."""
        return f"{self.dataset}:{self.sample_id}"

    @classmethod
    def from_tokens(
        cls,
        dataset: str,
        sample_id: int,
        label: str,
        is_positive: bool,
        tokens: Sequence[str],
        acts: Sequence[float],
    ) -> Window:
        """Build a window, computing ``peak`` and ``max_act`` from the activations."""
        acts_list = [float(a) for a in acts]
        peak = max(range(len(acts_list)), key=lambda i: acts_list[i]) if acts_list else 0
        return cls(
            dataset=dataset,
            sample_id=int(sample_id),
            label=label,
            is_positive=bool(is_positive),
            tokens=list(tokens),
            acts=acts_list,
            peak=peak,
            max_act=acts_list[peak] if acts_list else 0.0,
        )

    def text(self) -> str:
        return "".join(self.tokens)


@dataclass
class FeatureExamples:
    """Everything the describer, classifier and detection scorer see of one feature.

    ``top``: strongest activating windows; ``negatives``: matched windows where the feature is weak
    or silent (both shown to the describer). ``holdout`` / ``holdout_negatives``: activating and
    non-activating windows *not* shown to the describer, used only for scoring. ``validation`` /
    ``validation_negatives``: windows shown to neither, used to choose among candidate descriptions.
    """

    layer: int
    feature_id: int
    top: list[Window]
    negatives: list[Window]
    holdout: list[Window] = field(default_factory=list)
    holdout_negatives: list[Window] = field(default_factory=list)
    validation: list[Window] = field(default_factory=list)
    validation_negatives: list[Window] = field(default_factory=list)

    @property
    def key(self) -> tuple[int, int]:
        return (self.layer, self.feature_id)

    @property
    def scale(self) -> float:
        """The feature's strongest activation over the top windows (highlighting is relative to it)."""
        return max((w.max_act for w in self.top), default=0.0)


# --------------------------------------------------------------------------------------------
# Rubric
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Rendering untrusted text
# --------------------------------------------------------------------------------------------


def neutralize(text: str) -> str:
    """Make untrusted text safe to put inside a data block.

    Removes the block brackets ``⟦``/``⟧`` (so the text cannot close or open a block), replaces
    ``<``/``>`` by ``‹``/``›`` (so it cannot fake or break a ``<<highlight>>``) and drops control
    characters other than tab and newline.
    """
    text = text.replace(_BLOCK_OPEN, "[").replace(_BLOCK_CLOSE, "]")
    text = text.replace("<", "‹").replace(">", "›")
    return _CONTROL_CHARS.sub("", text)


def data_block(name: str, body: str) -> str:
    """Wrap already-neutralized ``body`` in a ``⟦name⟧ ... ⟦END name⟧`` block."""
    if _BLOCK_OPEN in body or _BLOCK_CLOSE in body:
        raise PromptError("data block body was not neutralized")
    return f"{_BLOCK_OPEN}{name}{_BLOCK_CLOSE}\n{body}\n{_BLOCK_OPEN}END {name}{_BLOCK_CLOSE}"


def _token(tok: str) -> str:
    return neutralize(tok[:MAX_TOKEN_CHARS])


def render_window(
    w: Window,
    *,
    scale: float | None = None,
    threshold_frac: float = 0.2,
    max_listed: int = 6,
    highlight: bool = True,
) -> str:
    """Render a window's text with activating tokens marked ``<<like this>>`` plus their activations.

    A token is *activating* when its activation exceeds ``threshold_frac * scale`` (``scale`` is the
    feature's maximum over its top windows; the window's own maximum when not given). Adjacent
    activating tokens share one mark; leading whitespace stays outside it. With
    ``highlight=False`` the plain (neutralized) text is returned, as detection scoring needs.
    """
    if not highlight:
        return neutralize("".join(t[:MAX_TOKEN_CHARS] for t in w.tokens)).strip()
    ref = scale if scale is not None and scale > 0 else w.max_act
    thr = threshold_frac * ref if ref > 0 else float("inf")
    active = [a > thr and a > 0 for a in w.acts]
    parts: list[str] = []
    i = 0
    n = len(w.tokens)
    while i < n:
        if not active[i]:
            parts.append(_token(w.tokens[i]))
            i += 1
            continue
        j = i
        while j < n and active[j]:
            j += 1
        span = "".join(_token(t) for t in w.tokens[i:j])
        stripped = span.lstrip()
        lead = span[: len(span) - len(stripped)]
        core = stripped.rstrip()
        trail = stripped[len(core) :]
        parts.append(f"{lead}<<{core}>>{trail}" if core else span)
        i = j
    text = "".join(parts).strip()
    listed = sorted((k for k in range(n) if active[k]), key=lambda k: (-w.acts[k], k))[:max_listed]
    if listed:
        acts = ", ".join(
            f"{json.dumps(_token(w.tokens[k]).strip(), ensure_ascii=False)} {w.acts[k]:.2f}" for k in listed
        )
    else:
        acts = "none above threshold"
    return f"{text}\nactivations: {acts}"


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prompt:
    """A built prompt: ``system`` is fixed per (kind, version, rubric) and sent as a cached block."""

    kind: str
    prompt_version: str
    system: str
    user: str


@cache
def _template(kind: str, version: str, part: str) -> string.Template:
    path = PROMPTS_DIR / f"{kind}_{version}.{part}.txt"
    try:
        return string.Template(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise PromptError(f"prompt template not found: {path} (kind={kind!r}, version={version!r})") from e


def _fill(kind: str, version: str, part: str, **values: object) -> str:
    try:
        return _template(kind, version, part).substitute(**values).strip() + "\n"
    except (KeyError, ValueError) as e:
        raise PromptError(f"template {kind}_{version}.{part}.txt: bad placeholder {e}") from e


def build_describe_prompt(
    fx: FeatureExamples, prompt_version: str = DEFAULT_PROMPT_VERSION, *, threshold_frac: float = 0.2
) -> Prompt:
    """The differential describe prompt: top windows (group A) against matched negatives (group B)."""
    if not fx.top:
        raise PromptError(f"feature {fx.layer}/{fx.feature_id}: no top windows to describe")
    scale = fx.scale
    top = "\n\n".join(
        data_block(f"EXAMPLE A{i}", render_window(w, scale=scale, threshold_frac=threshold_frac))
        for i, w in enumerate(fx.top, 1)
    )
    neg = (
        "\n\n".join(
            data_block(f"EXAMPLE B{i}", render_window(w, scale=scale, threshold_frac=threshold_frac))
            for i, w in enumerate(fx.negatives, 1)
        )
        or "(no matched negative windows)"
    )
    return Prompt(
        kind="describe",
        prompt_version=prompt_version,
        system=_fill("describe", prompt_version, "system"),
        user=_fill(
            "describe",
            prompt_version,
            "user",
            n_top=len(fx.top),
            n_negative=len(fx.negatives),
            top_blocks=top,
            negative_blocks=neg,
        ),
    )


def build_classify_prompt(
    description: str, rubric: Rubric, prompt_version: str = DEFAULT_PROMPT_VERSION
) -> Prompt:
    """Classify one description against ``rubric``; the rubric sits in the (cached) system text."""
    return Prompt(
        kind="classify",
        prompt_version=prompt_version,
        system=_fill(
            "classify",
            prompt_version,
            "system",
            rubric_block=rubric.prompt_block(),
            unrelated_max=rubric.unrelated_max,
            relevant_min=rubric.relevant_min,
        ),
        user=_fill("classify", prompt_version, "user", description=neutralize(description)),
    )


def build_classify_batch_prompt(
    items: Sequence[tuple[str, str]], rubric: Rubric, prompt_version: str = DEFAULT_PROMPT_VERSION
) -> Prompt:
    """Classify several ``(item_id, description)`` pairs in one call; ids must be simple tokens."""
    for item_id, _ in items:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", item_id):
            raise PromptError(f"batch item id {item_id!r} must match [A-Za-z0-9_-]{{1,32}}")
    blocks = "\n\n".join(data_block(f"ITEM {i}", neutralize(d)) for i, d in items)
    return Prompt(
        kind="classify_batch",
        prompt_version=prompt_version,
        system=_fill(
            "classify_batch",
            prompt_version,
            "system",
            rubric_block=rubric.prompt_block(),
            unrelated_max=rubric.unrelated_max,
            relevant_min=rubric.relevant_min,
        ),
        user=_fill("classify_batch", prompt_version, "user", n_items=len(items), item_blocks=blocks),
    )


def build_detect_prompt(
    description: str, windows: Sequence[Window], prompt_version: str = DEFAULT_PROMPT_VERSION
) -> Prompt:
    """Detection scoring: the description plus numbered plain windows (no highlights), 1-based."""
    if not windows:
        raise PromptError("detection needs at least one window")
    blocks = "\n\n".join(
        data_block(f"WINDOW {i}", render_window(w, highlight=False)) for i, w in enumerate(windows, 1)
    )
    return Prompt(
        kind="detect",
        prompt_version=prompt_version,
        system=_fill("detect", prompt_version, "system"),
        user=_fill(
            "detect",
            prompt_version,
            "user",
            description=neutralize(description),
            n_windows=len(windows),
            window_blocks=blocks,
        ),
    )


@dataclass(frozen=True)
class FuzzWindow:
    """A held-out activating window with a highlight: its firing tokens (``correct``) or as many decoy
    tokens where the feature is silent (not ``correct``)."""

    window: Window
    marked: tuple[bool, ...]
    correct: bool


def render_marked(w: Window, marked: Sequence[bool]) -> str:
    """A window's text with the tokens of ``marked`` in ``<<...>>`` (no activations shown)."""
    if len(marked) != len(w.tokens):
        raise PromptError(f"window {w.ref}: {len(marked)} marks for {len(w.tokens)} tokens")
    parts: list[str] = []
    i, n = 0, len(w.tokens)
    while i < n:
        if not marked[i]:
            parts.append(_token(w.tokens[i]))
            i += 1
            continue
        j = i
        while j < n and marked[j]:
            j += 1
        span = "".join(_token(t) for t in w.tokens[i:j])
        stripped = span.lstrip()
        lead = span[: len(span) - len(stripped)]
        core = stripped.rstrip()
        parts.append(f"{lead}<<{core}>>{stripped[len(core):]}" if core else span)
        i = j
    return "".join(parts).strip()


def fuzz_windows(
    windows: Sequence[Window], *, threshold_frac: float = 0.2, seed: str = "0"
) -> list[FuzzWindow]:
    """Fuzzing examples from held-out activating windows: a seeded half keep their firing tokens marked
    (activation above ``threshold_frac`` of the window's own peak), the other half get as many decoy
    tokens marked, drawn from the tokens where the feature is silent. A window with no silent token
    keeps its true marks. Order: as given (the caller shuffles)."""
    import random

    rng = random.Random(f"fuzz:{seed}")
    order = list(range(len(windows)))
    rng.shuffle(order)
    decoys = set(order[: len(windows) // 2])
    out = []
    for i, w in enumerate(windows):
        thr = threshold_frac * w.max_act
        true_mask = [a > thr and a > 0 for a in w.acts]
        if not any(true_mask):
            true_mask[w.peak] = True
        silent = [k for k, a in enumerate(w.acts) if a <= 0]
        if i in decoys and silent:
            k = min(sum(true_mask), len(silent))
            picked = set(rng.sample(silent, k))
            out.append(FuzzWindow(w, tuple(j in picked for j in range(len(w.tokens))), False))
        else:
            out.append(FuzzWindow(w, tuple(true_mask), True))
    return out


def build_fuzz_prompt(
    description: str, windows: Sequence[FuzzWindow], prompt_version: str = DEFAULT_PROMPT_VERSION
) -> Prompt:
    """Fuzzing: the description plus numbered windows with marked tokens; which marks fit it, 1-based."""
    if not windows:
        raise PromptError("fuzzing needs at least one window")
    blocks = "\n\n".join(
        data_block(f"WINDOW {i}", render_marked(fw.window, fw.marked)) for i, fw in enumerate(windows, 1)
    )
    return Prompt(
        kind="fuzz",
        prompt_version=prompt_version,
        system=_fill("fuzz", prompt_version, "system"),
        user=_fill(
            "fuzz",
            prompt_version,
            "user",
            description=neutralize(description),
            n_windows=len(windows),
            window_blocks=blocks,
        ),
    )


# --------------------------------------------------------------------------------------------
# Reply schemas and parsing
# --------------------------------------------------------------------------------------------

_Theme = Annotated[
    str, StringConstraints(strip_whitespace=True, to_lower=True, min_length=1, max_length=MAX_THEME_CHARS)
]


class DescribeReply(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    description: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=MAX_DESCRIPTION_CHARS)
    ]
    confidence: Annotated[int, Field(ge=1, le=5)]


class ClassifyReply(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    score: Annotated[int, Field(ge=0, le=10)]
    category: Category
    themes: Annotated[list[_Theme], Field(max_length=MAX_THEMES)]


class ClassifyBatchItem(ClassifyReply):
    id: str


class ClassifyBatchReply(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    results: list[ClassifyBatchItem]


class DetectReply(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    chosen: list[int]


_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?\s*```$", re.S)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise ReplyParseError(f"duplicate JSON keys: {sorted(dupes)}")
    return dict(pairs)


def _reject_constant(name: str) -> Any:
    raise ReplyParseError(f"non-finite number {name} in reply")


def extract_json_object(text: str) -> dict[str, Any]:
    """Parse a reply that is exactly one JSON object (optionally in one ```json fence).

    Duplicate keys, NaN/Infinity and anything before or after the object are rejected.
    """
    s = text.strip()
    m = _FENCE.match(s)
    if m:
        s = m.group(1).strip()
    if not s:
        raise ReplyParseError("empty reply")
    try:
        obj = json.loads(s, object_pairs_hook=_no_duplicate_keys, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ReplyParseError(f"reply is not one JSON object: {e.msg} at char {e.pos}: {_snippet(s)}") from e
    if not isinstance(obj, dict):
        raise ReplyParseError(f"reply is JSON {type(obj).__name__}, not an object: {_snippet(s)}")
    return obj


def _snippet(s: str, n: int = 120) -> str:
    s = " ".join(s.split())
    return s if len(s) <= n else s[:n] + "..."


def _validate(model: type[BaseModel], obj: dict[str, Any]) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        errs = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in e.errors()
        )
        raise ReplyParseError(f"reply does not fit the {model.__name__} schema: {errs}") from e


def parse_describe_reply(text: str) -> DescribeReply:
    """``{"description": str (1-400 chars), "confidence": int 1-5}`` or :class:`ReplyParseError`."""
    return _validate(DescribeReply, extract_json_object(text))


def _check_category(reply: ClassifyReply, rubric: Rubric, where: str = "") -> None:
    if reply.category == "unrelated" and reply.score > rubric.unrelated_max:
        raise ReplyParseError(
            f"{where}category 'unrelated' with score {reply.score} > {rubric.unrelated_max}"
        )
    if reply.category != "unrelated" and reply.score < rubric.relevant_min:
        raise ReplyParseError(
            f"{where}category {reply.category!r} with score {reply.score} < {rubric.relevant_min}"
        )


def parse_classify_reply(text: str, rubric: Rubric) -> ClassifyReply:
    """``{"score": 0-10, "category": known|discovery|unrelated, "themes": [str]}``, consistent with the rubric."""
    reply: ClassifyReply = _validate(ClassifyReply, extract_json_object(text))
    _check_category(reply, rubric)
    return reply


def parse_classify_batch_reply(text: str, ids: Sequence[str], rubric: Rubric) -> dict[str, ClassifyReply]:
    """A batch reply whose result ids are exactly ``ids`` (no missing, extra or repeated id)."""
    reply: ClassifyBatchReply = _validate(ClassifyBatchReply, extract_json_object(text))
    got = [r.id for r in reply.results]
    if len(got) != len(set(got)):
        raise ReplyParseError(f"batch reply repeats ids: {sorted({i for i in got if got.count(i) > 1})}")
    if set(got) != set(ids):
        raise ReplyParseError(
            f"batch reply ids differ from those asked: missing {sorted(set(ids) - set(got))}, "
            f"extra {sorted(set(got) - set(ids))}"
        )
    out: dict[str, ClassifyReply] = {}
    for r in reply.results:
        single = ClassifyReply(score=r.score, category=r.category, themes=list(r.themes))
        _check_category(single, rubric, where=f"item {r.id}: ")
        out[r.id] = single
    return out


def parse_fuzz_reply(text: str, n_windows: int) -> DetectReply:
    """The fuzzing reply has the detection schema: ``{"chosen": [int]}``, numbers in 1..n_windows."""
    return parse_detect_reply(text, n_windows)


def parse_detect_reply(text: str, n_windows: int) -> DetectReply:
    """``{"chosen": [int]}`` with each number in 1..n_windows and none repeated."""
    reply: DetectReply = _validate(DetectReply, extract_json_object(text))
    bad = [c for c in reply.chosen if not 1 <= c <= n_windows]
    if bad:
        raise ReplyParseError(f"chosen windows {bad} outside 1..{n_windows}")
    if len(set(reply.chosen)) != len(reply.chosen):
        raise ReplyParseError("chosen windows repeat a number")
    return reply


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class CallInfo:
    """Provenance and accounting of the model call(s) behind a record (summed over attempts)."""

    backend: str = ""
    model: str = ""
    prompt_version: str = ""
    cache_key: str = ""
    cached: bool = False
    attempts: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cost_usd: float | None = 0.0


class _RowRecord:
    """A record whose ``call`` (CallInfo) is inlined into one flat Parquet/DuckDB row."""

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)  # type: ignore[call-overload]
        row.update(row.pop("call"))
        return row


@dataclass
class DescriptionRecord(_RowRecord):
    """One feature's description. ``status='failed'`` rows carry ``error`` and no description."""

    layer: int
    feature_id: int
    status: Status
    description: str | None
    confidence: int | None
    error: str | None
    top_sample_ids: list[str]
    negative_sample_ids: list[str]
    call: CallInfo



@dataclass
class ClassificationRecord(_RowRecord):
    layer: int
    feature_id: int
    status: Status
    score: int | None
    category: Category | None
    themes: list[str]
    error: str | None
    rubric_version: str
    description: str
    description_cache_key: str
    batched: bool
    call: CallInfo



@dataclass
class DetectionRecord(_RowRecord):
    """Detection scoring of one description: which shuffled held-out windows the scorer picked."""

    layer: int
    feature_id: int
    status: Status
    error: str | None
    n_windows: int
    n_activating: int
    chosen: list[int]
    true_positives: int | None
    false_positives: int | None
    true_negatives: int | None
    false_negatives: int | None
    accuracy: float | None
    balanced_accuracy: float | None
    precision: float | None
    recall: float | None
    window_sample_ids: list[str]
    window_is_activating: list[bool]
    call: CallInfo



@dataclass
class ScoreRecord:
    """One scorer's verdict on one feature's description (a row of ``explanation_scores``).

    ``score`` is the scorer's headline figure (``metric``: balanced accuracy for detection and fuzzing,
    AUROC for embedding); ``balanced_accuracy`` is given for every scorer; ``n`` counts the windows scored.
    """

    layer: int
    feature_id: int
    scorer: str
    status: Status
    error: str | None
    score: float | None
    metric: str
    balanced_accuracy: float | None
    n: int
    n_activating: int
    window_sample_ids: list[str]
    window_is_activating: list[bool]
    chosen: list[int]
    call: CallInfo


@dataclass(frozen=True)
class DetectionScores:
    tp: int
    fp: int
    tn: int
    fn: int
    accuracy: float
    balanced_accuracy: float
    precision: float | None
    recall: float | None


def detection_scores(chosen: Sequence[int], truth: Sequence[bool]) -> DetectionScores:
    """Confusion counts and accuracies for 1-based ``chosen`` window numbers against ``truth``."""
    picked = set(chosen)
    tp = sum(1 for i, t in enumerate(truth, 1) if t and i in picked)
    fp = sum(1 for i, t in enumerate(truth, 1) if not t and i in picked)
    fn = sum(1 for i, t in enumerate(truth, 1) if t and i not in picked)
    tn = sum(1 for i, t in enumerate(truth, 1) if not t and i not in picked)
    n = len(truth)
    acc = (tp + tn) / n if n else 0.0
    rates = []
    if tp + fn:
        rates.append(tp / (tp + fn))
    if tn + fp:
        rates.append(tn / (tn + fp))
    bal = sum(rates) / len(rates) if rates else 0.0
    return DetectionScores(
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        accuracy=acc,
        balanced_accuracy=bal,
        precision=tp / (tp + fp) if tp + fp else None,
        recall=tp / (tp + fn) if tp + fn else None,
    )

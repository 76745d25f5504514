"""Versioned prompts (templates in ``dagster_project/prompts``) and the rendering of untrusted trace text
into them: data blocks, highlighted and marked windows, the fuzzing examples.

Trace text only ever appears inside ``⟦NAME⟧ ... ⟦END NAME⟧`` data blocks, and :func:`neutralize` removes
the block brackets from it and turns ``<``/``>`` into ``‹``/``›``, so a trace can neither close its block
nor fake a ``<<highlight>>``.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from dagster_project.lib.autointerp.rubric import Rubric
from dagster_project.lib.autointerp.windows import FeatureExamples, PromptError, Window

PROMPTS_DIR = Path(__file__).resolve().parent.parent.parent / "prompts"
DEFAULT_PROMPT_VERSION = "v1"
MAX_TOKEN_CHARS = 100

_BLOCK_OPEN = "⟦"
_BLOCK_CLOSE = "⟧"
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


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


def _mark_spans(tokens: Sequence[str], marked: Sequence[bool]) -> str:
    """The neutralized text of ``tokens`` with each run of ``marked`` tokens in one ``<<...>>`` (leading
    and trailing whitespace of a run stays outside its mark)."""
    parts: list[str] = []
    i, n = 0, len(tokens)
    while i < n:
        if not marked[i]:
            parts.append(_token(tokens[i]))
            i += 1
            continue
        j = i
        while j < n and marked[j]:
            j += 1
        span = "".join(_token(t) for t in tokens[i:j])
        stripped = span.lstrip()
        lead = span[: len(span) - len(stripped)]
        core = stripped.rstrip()
        parts.append(f"{lead}<<{core}>>{stripped[len(core):]}" if core else span)
        i = j
    return "".join(parts).strip()


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
    text = _mark_spans(w.tokens, active)
    listed = sorted((k for k in range(len(w.tokens)) if active[k]), key=lambda k: (-w.acts[k], k))[:max_listed]
    if listed:
        acts = ", ".join(
            f"{json.dumps(_token(w.tokens[k]).strip(), ensure_ascii=False)} {w.acts[k]:.2f}" for k in listed
        )
    else:
        acts = "none above threshold"
    return f"{text}\nactivations: {acts}"


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


def _rubric_system(kind: str, version: str, rubric: Rubric) -> str:
    """The system text of a classify prompt: the rubric block and its score bounds filled in."""
    return _fill(
        kind,
        version,
        "system",
        rubric_block=rubric.prompt_block(),
        unrelated_max=rubric.unrelated_max,
        relevant_min=rubric.relevant_min,
    )


def _windows_prompt(kind: str, version: str, description: str, blocks: Sequence[str]) -> Prompt:
    """A scoring prompt: the description and the numbered window ``blocks`` (detection and fuzzing)."""
    return Prompt(
        kind=kind,
        prompt_version=version,
        system=_fill(kind, version, "system"),
        user=_fill(
            kind,
            version,
            "user",
            description=neutralize(description),
            n_windows=len(blocks),
            window_blocks="\n\n".join(blocks),
        ),
    )


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
        system=_rubric_system("classify", prompt_version, rubric),
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
        system=_rubric_system("classify_batch", prompt_version, rubric),
        user=_fill("classify_batch", prompt_version, "user", n_items=len(items), item_blocks=blocks),
    )


def build_detect_prompt(
    description: str, windows: Sequence[Window], prompt_version: str = DEFAULT_PROMPT_VERSION
) -> Prompt:
    """Detection scoring: the description plus numbered plain windows (no highlights), 1-based."""
    if not windows:
        raise PromptError("detection needs at least one window")
    blocks = [data_block(f"WINDOW {i}", render_window(w, highlight=False)) for i, w in enumerate(windows, 1)]
    return _windows_prompt("detect", prompt_version, description, blocks)


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
    return _mark_spans(w.tokens, marked)


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
    blocks = [data_block(f"WINDOW {i}", render_marked(fw.window, fw.marked)) for i, fw in enumerate(windows, 1)]
    return _windows_prompt("fuzz", prompt_version, description, blocks)


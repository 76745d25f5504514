"""The JSON reply schemas of the describe, classify, detect and fuzz calls, and their strict parsing: a
reply that does not fit raises :class:`ReplyParseError` (the caller retries and finally records ``failed``,
never a made-up value)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from dagster_project.lib.autointerp.records import Category
from dagster_project.lib.autointerp.rubric import Rubric

MAX_DESCRIPTION_CHARS = 400
MAX_THEMES = 5
MAX_THEME_CHARS = 40


class ReplyParseError(ValueError):
    """A model reply is not one JSON object of the expected schema."""


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


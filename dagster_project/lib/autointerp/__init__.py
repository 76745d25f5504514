"""Differential autointerp: data types, prompt building, reply validation, records (a package; its
modules are named below and every public name is re-exported here).

A selected SAE feature comes in as a :class:`FeatureExamples`: the windows where it fires most
strongly (``top``), matched windows where it does not (``negatives``) and held-out windows for
detection scoring (``holdout`` activating, ``holdout_negatives`` not). From them the package builds
versioned prompts (templates in ``dagster_project/prompts``), validates the JSON replies against a
strict schema and defines the records the pipeline stores. Calling a model is
:mod:`dagster_project.lib.describers`' job.

Trace text is untrusted. It only ever appears inside ``⟦NAME⟧ ... ⟦END NAME⟧`` data blocks, and
:func:`neutralize` removes the block brackets from it and turns ``<``/``>`` into ``‹``/``›``, so a
trace can neither close its block nor fake a ``<<highlight>>``. The instructions tell the model that
block contents are data. A reply that does not fit its schema raises :class:`ReplyParseError`: the
caller retries and finally records ``failed``, never a made-up value.

- :mod:`~dagster_project.lib.autointerp.windows`: :class:`Window`, :class:`FeatureExamples`, :class:`PromptError`.
- :mod:`~dagster_project.lib.autointerp.rubric`: :class:`Rubric` and :func:`load_rubric`.
- :mod:`~dagster_project.lib.autointerp.prompts`: rendering untrusted text, the prompt builders, fuzzing windows.
- :mod:`~dagster_project.lib.autointerp.replies`: reply schemas and their parsing.
- :mod:`~dagster_project.lib.autointerp.records`: the stored records and detection scores.
"""

from dagster_project.lib.autointerp.prompts import (
    DEFAULT_PROMPT_VERSION,
    MAX_TOKEN_CHARS,
    PROMPTS_DIR,
    FuzzWindow,
    Prompt,
    build_classify_batch_prompt,
    build_classify_prompt,
    build_describe_prompt,
    build_detect_prompt,
    build_fuzz_prompt,
    data_block,
    fuzz_windows,
    neutralize,
    render_marked,
    render_window,
)
from dagster_project.lib.autointerp.records import (
    CallInfo,
    Category,
    ClassificationRecord,
    DescriptionRecord,
    DetectionRecord,
    DetectionScores,
    ScoreRecord,
    Status,
    detection_scores,
)
from dagster_project.lib.autointerp.replies import (
    MAX_DESCRIPTION_CHARS,
    MAX_THEME_CHARS,
    MAX_THEMES,
    ClassifyBatchItem,
    ClassifyBatchReply,
    ClassifyReply,
    DescribeReply,
    DetectReply,
    ReplyParseError,
    extract_json_object,
    parse_classify_batch_reply,
    parse_classify_reply,
    parse_describe_reply,
    parse_detect_reply,
    parse_fuzz_reply,
)
from dagster_project.lib.autointerp.rubric import (
    DEFAULT_RUBRIC,
    RUBRICS_DIR,
    Rubric,
    RubricPattern,
    load_rubric,
    rubric_path,
)
from dagster_project.lib.autointerp.windows import (
    FeatureExamples,
    PromptError,
    Window,
)

__all__ = [
    "CallInfo",
    "Category",
    "ClassificationRecord",
    "ClassifyBatchItem",
    "ClassifyBatchReply",
    "ClassifyReply",
    "DEFAULT_PROMPT_VERSION",
    "DEFAULT_RUBRIC",
    "DescribeReply",
    "DescriptionRecord",
    "DetectReply",
    "DetectionRecord",
    "DetectionScores",
    "FeatureExamples",
    "FuzzWindow",
    "MAX_DESCRIPTION_CHARS",
    "MAX_THEMES",
    "MAX_THEME_CHARS",
    "MAX_TOKEN_CHARS",
    "PROMPTS_DIR",
    "Prompt",
    "PromptError",
    "RUBRICS_DIR",
    "ReplyParseError",
    "Rubric",
    "RubricPattern",
    "ScoreRecord",
    "Status",
    "Window",
    "build_classify_batch_prompt",
    "build_classify_prompt",
    "build_describe_prompt",
    "build_detect_prompt",
    "build_fuzz_prompt",
    "data_block",
    "detection_scores",
    "extract_json_object",
    "fuzz_windows",
    "load_rubric",
    "neutralize",
    "parse_classify_batch_reply",
    "parse_classify_reply",
    "parse_describe_reply",
    "parse_detect_reply",
    "parse_fuzz_reply",
    "render_marked",
    "render_window",
    "rubric_path",
]

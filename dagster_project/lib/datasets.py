"""The dataset registry: which labelled text sets the pipeline runs on, and how to read each one.

A registry is a YAML file with a ``datasets:`` list. Each entry names a dataset (a safe slug: it becomes
a partition key and a path segment), where its rows come from, how to read them, how its raw labels map to
the positive / negative class, and its role (``train``, ``test``, ``ood`` or ``control``: negatives-only benign
or honest text on which detection thresholds are set)::

    datasets:
      - name: gold_alt
        source: ../../shared/data/bigsnarfdude__autointerp/gold_alt.json   # relative to this file
        format: json_samples        # json_list | json_samples | jsonl | demo
        text_field: text
        label_field: label
        labels: {positive: [alignment_faking], negative: [aligned]}
        role: train
        group_field: source         # optional: each row's group (generator / source) is this field's value
        # train_as_negatives: true  # control sets only: the calibration half also trains probes as negatives
        # group: my_generator       # optional: one group name for every row (default: the dataset's name)

A **group** is one generator or source. Probe training mixes groups and chooses probes on held-out groups
(leave one group out), so two datasets written by one generator should share a ``group``.

Sources: a local path (relative paths resolve against the registry file's folder), ``hf://datasets/<repo>/<file>``
(fetched through ``huggingface_hub``), or ``demo://<name>`` (the synthetic corpus this project generates).
``FEATURELAKE_DATASETS`` points at another registry file. Exact duplicate texts within a dataset are dropped
and counted; every other problem is a :class:`DatasetError` naming the file, row and field.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import yaml

from dagster_project.lib.tables import SAMPLES_SCHEMA

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_REGISTRY = REPO_ROOT / "registries" / "demo.yaml"
SLUG = re.compile(r"^[a-z0-9][a-z0-9_]{0,63}$")
ROLES = ("train", "test", "ood", "control")
FORMATS = ("json_list", "json_samples", "jsonl", "demo")
Role = Literal["train", "test", "ood", "control"]

class DatasetError(ValueError):
    """Bad registry entry or bad input row; the message names the file, row and field."""


def check_slug(name: str, what: str = "dataset name") -> str:
    if not isinstance(name, str) or not SLUG.match(name):
        raise DatasetError(
            f"unsafe {what} {name!r}: use 1-64 lowercase letters, digits and '_' (it becomes a path segment "
            "and a partition key)"
        )
    return name


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    source: str
    format: str
    text_field: str
    label_field: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    role: Role
    id_field: str | None = None
    default_label: str | None = None
    exclude_overlap_with: tuple[str, ...] = ()
    group: str | None = None
    group_field: str | None = None
    train_as_negatives: bool = False
    description: str = ""
    registry_path: str = ""
    base_dir: str = ""

    @property
    def positive_only(self) -> bool:
        return not self.negative

    def resolve_source(self) -> str:
        if "://" in self.source:
            return self.source
        p = Path(self.source).expanduser()
        if not p.is_absolute():
            p = Path(self.base_dir) / p
        return str(p.resolve())

    def fingerprint(self) -> str:
        """Stable hash of everything that decides this dataset's rows (not its description)."""
        d = {k: v for k, v in self.__dict__.items() if k not in ("description", "registry_path", "base_dir")}
        d["source"] = self.resolve_source()
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:16]


@dataclass
class LoadedDataset:
    spec: DatasetSpec
    table: pa.Table
    n_read: int
    n_duplicates: int
    n_excluded_overlap: int = 0
    label_counts: dict[str, int] = field(default_factory=dict)

    @property
    def n_positive(self) -> int:
        return int(sum(self.table.column("is_positive").to_pylist()))

    @property
    def n_negative(self) -> int:
        return self.table.num_rows - self.n_positive


def registry_path() -> Path:
    env = os.environ.get("FEATURELAKE_DATASETS")
    return Path(env).expanduser().resolve() if env else DEFAULT_REGISTRY


def _require(entry: dict[str, Any], key: str, where: str) -> Any:
    if key not in entry or entry[key] in (None, ""):
        raise DatasetError(f"{where}: missing field {key!r}")
    return entry[key]


def parse_registry(path: str | Path | None = None) -> dict[str, DatasetSpec]:
    """Read a registry file into ``{name: DatasetSpec}``, validating every entry."""
    path = Path(path) if path else registry_path()
    if not path.is_file():
        raise DatasetError(f"dataset registry {path} does not exist (set FEATURELAKE_DATASETS to a registry file)")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("datasets"), list):
        raise DatasetError(f"{path}: expected a mapping with a 'datasets:' list")
    specs: dict[str, DatasetSpec] = {}
    for i, entry in enumerate(doc["datasets"]):
        where = f"{path}, datasets[{i}]"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: expected a mapping")
        try:
            name = check_slug(_require(entry, "name", where))
        except DatasetError as e:
            raise DatasetError(e.args[0] if str(e).startswith(where) else f"{where}: field 'name': {e}") from None
        where = f"{path}, dataset {name!r}"
        if name in specs:
            raise DatasetError(f"{where}: dataset name defined twice")
        fmt = _require(entry, "format", where)
        if fmt not in FORMATS:
            raise DatasetError(f"{where}: field 'format' is {fmt!r}, expected one of {FORMATS}")
        role = _require(entry, "role", where)
        if role not in ROLES:
            raise DatasetError(f"{where}: field 'role' is {role!r}, expected one of {ROLES}")
        labels = _require(entry, "labels", where)
        if not isinstance(labels, dict) or not labels.get("positive") and not labels.get("negative"):
            raise DatasetError(f"{where}: field 'labels' needs 'positive' and/or 'negative' lists")
        for side in ("positive", "negative"):
            if not isinstance(labels.get(side) or [], list):
                raise DatasetError(f"{where}: field 'labels.{side}' must be a list of raw labels, "
                                   f"got {labels[side]!r}")
        pos = tuple(str(x) for x in labels.get("positive") or ())
        neg = tuple(str(x) for x in labels.get("negative") or ())
        both = set(pos) & set(neg)
        if both:
            raise DatasetError(f"{where}: labels {sorted(both)} are both positive and negative")
        if not isinstance(entry.get("exclude_overlap_with") or [], list):
            raise DatasetError(f"{where}: field 'exclude_overlap_with' must be a list of dataset names, "
                               f"got {entry['exclude_overlap_with']!r}")
        if role == "control" and pos:
            raise DatasetError(f"{where}: role 'control' is for negatives-only text, but 'labels.positive' is "
                               f"{list(pos)}")
        group = entry.get("group")
        if group is not None:
            check_slug(str(group), f"{where}: field 'group'")
        group_field = entry.get("group_field")
        if group_field is not None and (not isinstance(group_field, str) or not group_field):
            raise DatasetError(f"{where}: field 'group_field' must be a field name, got {group_field!r}")
        if group is not None and group_field is not None:
            raise DatasetError(f"{where}: give 'group' or 'group_field', not both")
        as_neg = entry.get("train_as_negatives", False)
        if not isinstance(as_neg, bool):
            raise DatasetError(f"{where}: field 'train_as_negatives' must be true or false, got {as_neg!r}")
        if as_neg and role != "control":
            raise DatasetError(f"{where}: field 'train_as_negatives' is for control sets (role is {role!r})")
        default_label = entry.get("default_label")
        if default_label is not None and str(default_label) not in (*pos, *neg):
            raise DatasetError(f"{where}: field 'default_label' is {default_label!r}, which 'labels' does not map "
                               f"(mapped: {sorted((*pos, *neg))})")
        specs[name] = DatasetSpec(
            name=name,
            source=str(_require(entry, "source", where)),
            format=fmt,
            text_field=str(entry.get("text_field", "text")),
            label_field=str(entry.get("label_field", "label")),
            positive=pos,
            negative=neg,
            role=role,
            id_field=entry.get("id_field"),
            default_label=None if default_label is None else str(default_label),
            exclude_overlap_with=tuple(entry.get("exclude_overlap_with") or ()),
            group=None if group is None else str(group),
            group_field=group_field,
            train_as_negatives=as_neg,
            description=str(entry.get("description", "")),
            registry_path=str(path),
            base_dir=str(path.parent),
        )
    for spec in specs.values():
        for other in spec.exclude_overlap_with:
            if other not in specs:
                raise DatasetError(
                    f"{path}, dataset {spec.name!r}: field 'exclude_overlap_with' names unknown dataset {other!r}"
                )
    for spec in specs.values():  # loading follows these edges recursively: a cycle would never end
        todo = list(spec.exclude_overlap_with)
        seen: set[str] = set()
        while todo:
            other = todo.pop()
            if other == spec.name:
                raise DatasetError(
                    f"{path}, dataset {spec.name!r}: field 'exclude_overlap_with' forms a cycle through "
                    f"{sorted(seen | {spec.name})}"
                )
            if other not in seen:
                seen.add(other)
                todo.extend(specs[other].exclude_overlap_with)
    if not specs:
        raise DatasetError(f"{path}: the registry lists no datasets")
    return specs


def get_spec(name: str, specs: dict[str, DatasetSpec] | None = None) -> DatasetSpec:
    specs = specs if specs is not None else parse_registry()
    if name not in specs:
        where = next(iter(specs.values())).registry_path if specs else registry_path()
        raise DatasetError(f"unknown dataset {name!r}; the registry {where} has {sorted(specs)}")
    return specs[name]


# ----------------------------------------------------------------------------------------------- reading


def _fetch(spec: DatasetSpec) -> tuple[str, bytes | None]:
    """Return (display path, raw bytes) of a dataset's source; ``None`` bytes for demo sources."""
    src = spec.resolve_source()
    if src.startswith("demo://"):
        return src, None
    if src.startswith("hf://"):
        m = re.match(r"^hf://datasets/([^/]+/[^/]+)/(.+)$", src)
        if not m:
            raise DatasetError(f"{spec.registry_path}, dataset {spec.name!r}: source {src!r} is not "
                               "hf://datasets/<owner>/<repo>/<file>")
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(repo_id=m.group(1), filename=m.group(2), repo_type="dataset")
        return src, Path(local).read_bytes()
    if "://" in src:
        raise DatasetError(f"{spec.registry_path}, dataset {spec.name!r}: unsupported source scheme in {src!r}")
    p = Path(src)
    if not p.is_file():
        raise DatasetError(f"{spec.registry_path}, dataset {spec.name!r}: source file {p} does not exist")
    return str(p), p.read_bytes()


def _decode(path: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DatasetError(f"{path}: line {line}: not UTF-8 (byte offset {e.start}: {raw[e.start:e.start + 4]!r})") from e


def iter_raw_rows(spec: DatasetSpec) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(row locator, record)`` for each raw row; the locator names the file and row."""
    path, raw = _fetch(spec)
    if raw is None:
        from dagster_project.lib import demo_corpus

        name = spec.resolve_source().removeprefix("demo://")
        for i, rec in enumerate(demo_corpus.generate(name)):
            yield f"{path}, row {i}", rec
        return
    text = _decode(path, raw)
    if spec.format == "jsonl":
        # JSON Lines ends records at "\n" only: str.splitlines() would also split inside strings that hold a
        # raw U+2028, U+0085 or form feed (valid unescaped in JSON), and its line numbers would drift.
        lines = text.split("\n")
        last_n = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                last = " (truncated last line?)" if n == last_n else ""
                raise DatasetError(f"{path}: line {n}: malformed JSON{last}: {e.msg} at column {e.colno}") from e
            if not isinstance(rec, dict):
                raise DatasetError(f"{path}: line {n}: expected a JSON object, got {type(rec).__name__}")
            yield f"{path}, line {n}", rec
        return
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if spec.format == "json_samples":
        if not isinstance(doc, dict) or not isinstance(doc.get("samples"), list):
            raise DatasetError(f"{path}: format json_samples expects an object with a 'samples' list")
        rows, prefix = doc["samples"], "samples"
    else:
        if not isinstance(doc, list):
            raise DatasetError(f"{path}: format json_list expects a JSON list, got {type(doc).__name__}")
        rows, prefix = doc, "row"
    for i, rec in enumerate(rows):
        where = f"{path}, {prefix}[{i}]" if prefix == "samples" else f"{path}, row {i}"
        if not isinstance(rec, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        yield where, rec


def normalize_text(text: str) -> str:
    return " ".join(text.split())


def load_dataset(spec: DatasetSpec, specs: dict[str, DatasetSpec] | None = None) -> LoadedDataset:
    """Read, validate, label-map and de-duplicate one dataset into a ``samples`` table."""
    allowed = {**{lab: True for lab in spec.positive}, **{lab: False for lab in spec.negative}}
    exclude: set[str] = set()
    if spec.exclude_overlap_with:
        specs = specs if specs is not None else parse_registry(spec.registry_path)
        for other in spec.exclude_overlap_with:
            exclude |= {normalize_text(t) for t in load_dataset(specs[other], specs).table.column("text").to_pylist()}
    seen_text: set[str] = set()
    seen_ids: dict[str, str] = {}
    cols: dict[str, list[Any]] = {k: [] for k in SAMPLES_SCHEMA.names}
    n_read = n_dup = n_excl = 0
    label_counts: dict[str, int] = {}
    for where, rec in iter_raw_rows(spec):
        n_read += 1
        if spec.text_field not in rec:
            raise DatasetError(f"{where}: missing text field {spec.text_field!r} (keys: {sorted(rec)[:8]})")
        text = rec[spec.text_field]
        if not isinstance(text, str):
            raise DatasetError(f"{where}: field {spec.text_field!r} is {type(text).__name__}, expected a string")
        if not text.strip():
            raise DatasetError(f"{where}: field {spec.text_field!r} is empty or whitespace")
        if spec.label_field in rec and rec[spec.label_field] is not None:
            label = str(rec[spec.label_field])
        elif spec.default_label is not None:
            label = spec.default_label
        else:
            raise DatasetError(f"{where}: missing label field {spec.label_field!r}")
        if label not in allowed:
            raise DatasetError(
                f"{where}: field {spec.label_field!r} has unknown raw label {label!r}; "
                f"the registry maps {sorted(allowed)} (add it to 'labels' in {spec.registry_path})"
            )
        source_id = None
        if spec.id_field:
            if spec.id_field not in rec:
                raise DatasetError(f"{where}: missing id field {spec.id_field!r}")
            source_id = str(rec[spec.id_field])
            if source_id in seen_ids:
                raise DatasetError(
                    f"{where}: field {spec.id_field!r}: duplicate id {source_id!r} (first at {seen_ids[source_id]})"
                )
            seen_ids[source_id] = where
        if text in seen_text:
            n_dup += 1
            continue
        if exclude and normalize_text(text) in exclude:
            n_excl += 1
            continue
        if spec.group_field:
            if rec.get(spec.group_field) in (None, ""):
                raise DatasetError(f"{where}: missing group field {spec.group_field!r} (registry 'group_field')")
            group = f"{spec.name}/{rec[spec.group_field]}"
        else:
            group = spec.group or spec.name
        seen_text.add(text)
        label_counts[label] = label_counts.get(label, 0) + 1
        cols["sample_id"].append(len(cols["sample_id"]))
        cols["source_id"].append(source_id)
        cols["text"].append(text)
        cols["label"].append(label)
        cols["is_positive"].append(allowed[label])
        cols["role"].append(spec.role)
        cols["n_chars"].append(len(text))
        cols["group"].append(group)
    if not cols["sample_id"]:
        raise DatasetError(f"{spec.resolve_source()}: dataset {spec.name!r} has no rows")
    table = pa.table(cols, schema=SAMPLES_SCHEMA)
    return LoadedDataset(spec, table, n_read, n_dup, n_excl, label_counts)

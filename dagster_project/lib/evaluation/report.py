"""The static HTML probe report of one layer: :func:`feature_infos` reads what each feature page shows,
:func:`feature_page` / :func:`render_window` render it (escaped, styled by ``report.css``) and
:func:`write_report` writes ``report/layer=L/index.html`` with its figures and feature pages."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import Any

import duckdb
import polars as pl
import pyarrow as pa

from dagster_project.lib import generalisation
from dagster_project.lib.evaluation.data import polars_of, view_names
from dagster_project.lib.evaluation.schemas import TOKEN_ACTIVATIONS_VIEW
from dagster_project.lib.evaluation.settings import PROVENANCE_KEYS, EvalSettings
from dagster_project.lib.evaluation.summary import auroc_cell
from dagster_project.lib.lake import (
    Lake,
    LakePath,
    staged_dir,
    write_bytes,
)
from dagster_project.lib.markdown import fmt_cell
from dagster_project.lib.probes import FittedProbe
from dagster_project.lib.probes.fitted import written_aside
from dagster_project.lib.sql import relation

REPORT_DIR = "report"
REPORT_FILES = "probes"  # sub-folder of report/layer=L holding this report's figures and feature pages


@dataclass
class WindowToken:
    token_pos: int
    text: str
    act: float


@dataclass
class Window:
    rank: int
    dataset: str
    sample_id: int
    role: str
    label: str
    is_positive: bool | None
    max_act: float
    argmax_token: int
    n_tokens: int
    tokens: list[WindowToken]


@dataclass
class FeatureInfo:
    """What a feature page shows."""

    feature_id: int
    weight: float
    stats: dict[str, Any]
    description: str | None
    classification: dict[str, Any] | None
    firing: list[dict[str, Any]]
    windows: list[Window]


def _cursor_with_empty(
    con: duckdb.DuckDBPyConnection, needed: Mapping[str, pa.Schema]
) -> duckdb.DuckDBPyConnection:
    """A cursor on which every view of ``needed`` exists (missing ones as empty tables)."""
    cur = con.cursor()
    have = view_names(cur)
    for name, schema in needed.items():
        if name not in have:
            cur.register(name, schema.empty_table())
    return cur


def feature_infos(
    con: duckdb.DuckDBPyConnection, layer: int, probe: FittedProbe, settings: EvalSettings
) -> list[FeatureInfo]:
    """The report's features: the probe's non-zero weights by magnitude, at most ``report_max_features``."""
    top = probe.top_features(settings.report_max_features)
    if not top:
        return []
    ids = [f for f, _ in top]
    params = {"layer": int(layer), "feature_ids": ids}
    views = view_names(con)
    stats: dict[int, dict[str, Any]] = {}
    if "feature_stats" in views:
        for r in polars_of(relation(con, "probes/feature_selectivity", params)).iter_rows(named=True):
            stats[int(r.pop("feature_id"))] = r
    descriptions: dict[int, str] = {}
    if "descriptions" in views:
        for r in polars_of(relation(con, "probes/feature_descriptions", params)).iter_rows(named=True):
            descriptions[int(r["feature_id"])] = str(r["description"])
    classes: dict[int, dict[str, Any]] = {}
    if "classifications" in views:
        for r in polars_of(relation(con, "probes/feature_classifications", params)).iter_rows(named=True):
            classes[int(r.pop("feature_id"))] = r
    firing: dict[int, list[dict[str, Any]]] = {}
    for r in polars_of(relation(con, "probes/feature_firing", params)).iter_rows(named=True):
        firing.setdefault(int(r.pop("feature_id")), []).append(r)
    windows: dict[int, list[Window]] = {}
    if "tokens" in views:
        cur = _cursor_with_empty(con, {"token_activations": TOKEN_ACTIVATIONS_VIEW})
        try:
            wdf = polars_of(
                relation(
                    cur,
                    "probes/feature_windows",
                    {**params, "top_k": settings.report_top_windows, "window": settings.report_window_tokens},
                )
            )
        finally:
            cur.close()
        for (fid, rank), g in wdf.group_by(["feature_id", "rank"], maintain_order=True):
            first = g.row(0, named=True)
            windows.setdefault(int(fid), []).append(
                Window(
                    rank=int(rank),
                    dataset=str(first["dataset"]),
                    sample_id=int(first["sample_id"]),
                    role=str(first["role"]),
                    label=str(first["label"]),
                    is_positive=first["is_positive"],
                    max_act=float(first["max_act"]),
                    argmax_token=int(first["argmax_token"]),
                    n_tokens=int(first["n_tokens"]),
                    tokens=[
                        WindowToken(int(p), str(t) if t is not None else "", float(a))
                        for p, t, a in zip(g["token_pos"], g["token_text"], g["act"], strict=True)
                    ],
                )
            )
    return [
        FeatureInfo(
            feature_id=f,
            weight=w,
            stats=stats.get(f, {}),
            description=descriptions.get(f),
            classification=classes.get(f),
            firing=firing.get(f, []),
            windows=sorted(windows.get(f, []), key=lambda x: x.rank),
        )
        for f, w in top
    ]


@cache
def report_css() -> str:
    """The report's stylesheet (``report.css`` beside this module)."""
    return files("dagster_project.lib.evaluation").joinpath("report.css").read_text(encoding="utf-8")


def _e(v: Any) -> str:
    return html.escape(fmt_cell(v), quote=True)


def _html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], links: Mapping[str, str] | None = None) -> str:
    """An HTML table, every cell escaped; ``links`` maps a column to an href template with ``{value}``."""
    links = links or {}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in rows:
        cells = []
        for c in columns:
            text = _e(r.get(c))
            if c in links and r.get(c) is not None:
                href = html.escape(links[c].format(value=r[c]), quote=True)
                text = f'<a href="{href}">{text}</a>'
            cells.append(f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>\n{report_css()}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def render_window(w: Window) -> str:
    """One window as HTML: tokens escaped, shaded by the feature's activation, the peak outlined."""
    peak = max([t.act for t in w.tokens] + [w.max_act, 1e-12])
    parts = []
    if w.tokens and w.tokens[0].token_pos > 0:
        parts.append('<span class="muted">… </span>')
    for t in w.tokens:
        cls = "tok peak" if t.token_pos == w.argmax_token else "tok"
        style = ""
        if t.act > 0:
            alpha = 0.15 + 0.85 * min(1.0, t.act / peak)
            style = f' style="background: rgba(255, 140, 0, {alpha:.2f})"'
        title = html.escape(f"pos {t.token_pos}, act {t.act:.3f}", quote=True)
        parts.append(f'<span class="{cls}"{style} title="{title}">{html.escape(t.text)}</span>')
    if w.tokens and w.tokens[-1].token_pos < w.n_tokens - 1:
        parts.append('<span class="muted"> …</span>')
    return "".join(parts)


def feature_page(info: FeatureInfo, layer: int, probe_name: str) -> str:
    title = f"Feature {info.feature_id} (layer {layer})"
    body = [f"<p><a href=\"../../index.html\">← report for layer {layer}</a></p>", f"<h1>{html.escape(title)}</h1>"]
    desc = html.escape(info.description) if info.description else '<span class="muted">no description yet</span>'
    body.append(f"<p><b>Description:</b> {desc}</p>")
    if info.classification:
        c = info.classification
        body.append(
            f"<p><b>Relevance:</b> score {_e(c.get('score'))} / 10, category {_e(c.get('category'))}, "
            f"themes {_e(c.get('themes'))}</p>"
        )
    else:
        body.append('<p><b>Relevance:</b> <span class="muted">not classified</span></p>')
    body.append(
        f"<p><b>Weight</b> in <code>{html.escape(probe_name)}</code> (standardised feature): "
        f"{info.weight:+.4f}</p>"
    )
    if info.stats:
        body.append("<h2>Training statistics</h2>")
        body.append(_html_table([info.stats], list(info.stats)))
    body.append("<h2>Firing rates per dataset</h2>")
    body.append(
        _html_table(
            info.firing, ["dataset", "role", "n", "firing_rate", "firing_rate_pos", "firing_rate_neg", "mean_max_act"]
        )
    )
    body.append("<h2>Top windows</h2>")
    if not info.windows:
        body.append('<p class="muted">no token windows (tokens or token_activations not in the lake)</p>')
    for w in info.windows:
        body.append(
            f"<p>#{w.rank}: <b>{html.escape(w.dataset)}</b> sample {w.sample_id} ({html.escape(w.role)}, "
            f"label {html.escape(w.label)}), max act {w.max_act:.3f} at token {w.argmax_token}</p>"
            f'<div class="window">{render_window(w)}</div>'
        )
    return _page(title, "\n".join(body))


def feature_page_name(feature_id: int) -> str:
    return f"feature_{int(feature_id)}.html"


def _explanation_score_rows(lake: Lake, layer: int) -> list[dict[str, Any]]:
    """The layer's ``stats/explanation_scores`` rows (written by the describe stage's scorers), if any."""
    if not lake.exists("stats/explanation_scores", layer=layer):
        return []
    return lake.read("stats/explanation_scores", layer=layer).select(["feature_id", "scorer", "score", "status"]).to_pylist()


def report_dir(lake: Lake, layer: int) -> LakePath:
    return lake.base / REPORT_DIR / f"layer={int(layer)}"


def write_report(
    lake: Lake,
    layer: int,
    *,
    provenance: Mapping[str, Any],
    probes_table: pa.Table | pl.DataFrame,
    metrics: pa.Table | pl.DataFrame,
    cross: pa.Table | pl.DataFrame,
    figures: Mapping[str, bytes],
    features: Sequence[FeatureInfo],
    best_probe_name: str | None,
    lodo: pa.Table | pl.DataFrame | None = None,
    layers: pl.DataFrame | None = None,
) -> LakePath:
    """Write ``report/layer=L/index.html`` and its files under ``report/layer=L/probes/``.

    The ``probes/`` folder (figures, one page per feature) is built aside and renamed into place, then
    ``index.html`` is written aside and renamed over the old one. Other files of the folder are left alone.
    On S3 the ``probes/`` folder is built locally and uploaded (each object whole, stale pages deleted),
    then ``index.html`` is uploaded last in one PUT.
    """
    base = report_dir(lake, layer)
    scorer_rows = _explanation_score_rows(lake, layer)
    if scorer_rows:
        from dagster_project.lib.scorers import scorer_figure

        figures = {**figures, "explanation_scores": scorer_figure(
            scorer_rows, f"Description scores by scorer, layer {int(layer)} (held-out windows)")}
    with staged_dir(base / REPORT_FILES) as files_dir, written_aside(files_dir) as tmp:
        (tmp / "figures").mkdir()
        (tmp / "features").mkdir()
        for name, png in figures.items():
            (tmp / "figures" / f"{name}.png").write_bytes(png)
        for info in features:
            (tmp / "features" / feature_page_name(info.feature_id)).write_text(
                feature_page(info, layer, best_probe_name or ""), encoding="utf-8"
            )

    pr, m, cr = (generalisation.frame(t) for t in (probes_table, metrics, cross))
    body = [f"<h1>Probes, layer {int(layer)}</h1>"]
    prov = {k: provenance.get(k) for k in ("profile", *PROVENANCE_KEYS, "train_datasets") if k in provenance}
    body.append(_html_table([prov], list(prov)))
    body.append("<h2>Recommended SAE probe vs dense baseline</h2>")
    head_rows = []
    for r in m.filter(pl.col("is_best")).sort(["eval_role", "eval_dataset", "kind"]).iter_rows(named=True):
        head_rows.append({**r, "auroc [95% CI]": auroc_cell(r)})
    body.append(f"<p><b>Recommendation.</b> {html.escape(generalisation.recommendation(pr, m, lodo))}</p>")
    if layers is not None and layers.height > 1:
        body.append("<h3>Across layers (best probe of each layer by its selection score)</h3>")
        body.append(_html_table(list(layers.iter_rows(named=True)), layers.columns))
    body.append(
        _html_table(
            head_rows,
            ["kind", "probe", "eval_dataset", "eval_role", "auroc [95% CI]", "accuracy", "tpr_at_1pct_fpr",
             "fpr_at_1pct_fpr", "detection_rate", "threshold_source", "n_pos", "n_neg"],
        )
    )
    held = generalisation.held_out_table(lodo)
    body.append("<h2>Held-out groups (leave one group out)</h2>")
    if held.height:
        body.append("<p>Each row: the probe's configuration refitted without that group (and without its near "
                    "duplicates), features re-chosen without it, scored on it. A one-class group is scored against "
                    "the control sets' check half (<code>vs control</code>).</p>")
        body.append(_html_table(list(held.iter_rows(named=True)), held.columns))
    else:
        body.append('<p class="muted">none: the training mixture has fewer than two groups that can be held out, '
                    "so the probes were chosen by training cross-validation</p>")
    fam = generalisation.family_table(pr, m)
    if fam.height:
        body.append("<h2>In distribution vs out of distribution, per probe family</h2>")
        body.append(_html_table(list(fam.iter_rows(named=True)), fam.columns))
    ctl = generalisation.control_table(m)
    if ctl.height:
        body.append("<h2>Control sets: false positives at the chosen threshold (check half)</h2>")
        body.append(_html_table(list(ctl.iter_rows(named=True)), ctl.columns))
    if scorer_rows:
        from dagster_project.lib.scorers import scorer_summary

        body.append("<h2>How well the descriptions explain their features</h2>")
        body.append("<p>Each selected feature's description scored on held-out windows it was not written from: "
                    "<b>detection</b> (which windows fire, activating ones from every activation decile), "
                    "<b>fuzzing</b> (whether marked tokens are the firing ones or decoys) and <b>embedding</b> "
                    "(MiniLM similarity of description and window, AUROC; no model call). 0.5 is chance. "
                    "The <code>explanation_scores</code> view has every row; the figure "
                    "<code>explanation_scores</code> below plots them.</p>")
        summary = scorer_summary(scorer_rows)
        body.append(_html_table(summary, ["scorer", "metric", "ok", "failed", "mean", "std", "q25", "median", "q75"]))
    body.append("<h2>Figures</h2>")
    for name in figures:
        src = html.escape(f"{REPORT_FILES}/figures/{name}.png", quote=True)
        body.append(f'<h3>{html.escape(name)}</h3><img src="{src}" alt="{html.escape(name, quote=True)}">')
    body.append(f"<h2>Features of the best SAE probe ({len(features)})</h2>")
    feat_rows = [
        {
            "feature_id": f.feature_id,
            "weight": f.weight,
            "selectivity": f.stats.get("selectivity"),
            "relevance": (f.classification or {}).get("score"),
            "description": f.description,
        }
        for f in features
    ]
    body.append(
        _html_table(
            feat_rows,
            ["feature_id", "weight", "selectivity", "relevance", "description"],
            links={"feature_id": f"{REPORT_FILES}/features/feature_{{value}}.html"},
        )
    )
    body.append("<h2>Cross-distribution (best configurations refitted per dataset)</h2>")
    body.append(
        _html_table(
            [{**r, "auroc [95% CI]": auroc_cell(r)} for r in cr.iter_rows(named=True)],
            ["kind", "train_dataset", "eval_dataset", "eval_role", "in_distribution", "auroc [95% CI]", "cv_std",
             "detection_rate", "n_pos", "n_neg"],
        )
    )
    body.append("<h2>All probes (by rank: held-out groups, else training CV)</h2>")
    cols = [c for c in ("probe_id", "kind", "feature_set", "penalty", "C", "transform", "n_features", "n_nonzero",
                        "rank", "selection_score", "lodo_worst_auroc", "lodo_mean_auroc", "cv_auroc", "cv_std",
                        "cv_rank", "degenerate", "converged") if c in pr.columns]
    body.append(_html_table(list(pr.sort("rank" if "rank" in pr.columns else "cv_rank").iter_rows(named=True)), cols))
    body.append("<h2>All evaluations</h2>")
    body.append(
        _html_table(
            [{**r, "auroc [95% CI]": auroc_cell(r)} for r in m.iter_rows(named=True)],
            ["probe", "kind", "eval_dataset", "eval_role", "auroc [95% CI]", "accuracy", "tpr_at_1pct_fpr",
             "detection_rate", "mean_score", "n", "by_label"],
        )
    )
    page = _page(f"featurelake probes, layer {int(layer)}", "\n".join(body))
    return write_bytes(base / "index.html", page.encode("utf-8"))

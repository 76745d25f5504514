"""The describe assets (descriptions, classifications, detection_scores, themes) on a planted lake.

The lake (``dagster_project.testing.describe_lake``) has eight selected features, each firing on its own
trigger word; the Anthropic backend talks to the local protocol server with faults injected.
"""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster._serdes import serialize_value

from assets.describe import classifications, descriptions, detection_scores, themes
from dagster_project.config import DescriberSpec
from dagster_project.describer_resource import DescriberResource, describer_resource
from dagster_project.lib.catalog import views_connection
from dagster_project.lib.describe_examples import ExamplesError, ExampleSettings, load_examples
from dagster_project.lib.describers import LLMConfigError
from dagster_project.lib.scorers import SCORERS
from dagster_project.partitions import LAYER_PARTITIONS_NAME
from dagster_project.resources import LakeResource
from dagster_project.testing.anthropic_server import AnthropicTestServer, FaultPlan, FaultRule
from dagster_project.testing.describe_lake import DescribeLake, build_describe_lake

LAYER = 1
ASSETS = [descriptions, classifications, detection_scores, themes]
FAST = {"max_attempts": 3, "retry_base_delay_s": 0.01, "retry_max_delay_s": 0.05}
# The original describe settings (one description per feature, held-out windows the next ranks by max_act,
# detection the only LLM scorer): the tests written for them count calls and windows exactly. The tests of
# the defaults (best-of-n, decile-sampled held-out windows, three scorers) pass ``legacy=False``.
LEGACY = {"n_candidates": 1, "n_holdout": 5, "n_holdout_negatives": 5, "holdout_sampling": "next",
          "scorers": ["detection", "embedding"]}
FAILING_WORD = "zanzibar"  # the planted feature 21 fires on it; its describe prompt marks it <<zanzibar
FAILING_FEATURE = 21
RARE_FEATURE = 41  # fires in 3 samples: fewer than top_k, so no held-out windows


def _materialize(
    root: Path,
    describer: DescriberResource,
    instance: dg.DagsterInstance | None = None,
    selection: list[Any] | None = None,
    config: dict[str, Any] | None = None,
    raise_on_error: bool = True,
    legacy: bool = True,
) -> tuple[dg.ExecuteInProcessResult, dg.DagsterInstance]:
    if instance is None:
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(LAYER_PARTITIONS_NAME, [str(LAYER)])
    chosen = selection or ASSETS
    result = dg.materialize(
        chosen,
        partition_key=str(LAYER),
        resources={"lake": LakeResource(root=str(root), namespace="t"), "describer": describer},
        instance=instance,
        run_config={"ops": {a.op.name: {"config": {**FAST, **(LEGACY if legacy and a.op.name != "themes" else {}),
                                                   **(config or {})}} for a in chosen}},
        raise_on_error=raise_on_error,
    )
    return result, instance


def _meta(result: dg.ExecuteInProcessResult, node: str) -> dict[str, Any]:
    (mat,) = result.asset_materializations_for_node(node)
    return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}


def _rows(dl: DescribeLake, table: str) -> dict[int, dict[str, Any]]:
    rows = dl.lake.read(f"stats/{table}", layer=LAYER).to_pylist()
    ids = [r["feature_id"] for r in rows]
    assert len(ids) == len(set(ids)), f"{table}: duplicated features"
    return {r["feature_id"]: r for r in rows}


def _ref(ref: str) -> tuple[str, int]:
    dataset, sid = ref.rsplit(":", 1)
    return dataset, int(sid)


# ------------------------------------------------------------------------------------------ SQL windows


def _reference_negatives(
    dl: DescribeLake, fid: int, top: list[tuple[str, int]], holdout: list[tuple[str, int]], s: ExampleSettings
) -> dict[str, list[tuple[str, int]]]:
    """The documented greedy: pick k serves anchor (k-1) mod n (top anchors, then held-out ones) and takes
    its best unused zero-activation sample by (same class, same dataset, nearest length, dataset, id)."""
    candidates = sorted(k for k in dl.n_tokens if (fid, *k) not in dl.active)
    used: list[tuple[str, int]] = []
    out: dict[str, list[tuple[str, int]]] = {"negative": [], "holdout_negative": []}
    for k in range(1, s.n_negatives + s.n_holdout_negatives + 1):
        part, anchors, j = (("negative", top, k - 1) if k <= s.n_negatives
                            else ("holdout_negative", holdout, k - s.n_negatives - 1))
        if not anchors:
            break
        a = anchors[j % len(anchors)]
        free = [c for c in candidates if c not in used]
        if not free:
            break

        def key(c: tuple[str, int], a: tuple[str, int] = a) -> tuple[Any, ...]:
            return (dl.is_positive[c] != dl.is_positive[a], c[0] != a[0],
                    abs(dl.n_tokens[c] - dl.n_tokens[a]), c[0], c[1])

        best = min(free, key=key)
        used.append(best)
        out[part].append(best)
    return out


def test_windows_follow_the_documented_selection(tmp_path: Path) -> None:
    dl = build_describe_lake(tmp_path)
    settings = ExampleSettings()
    con = views_connection(dl.lake)
    ex = load_examples(con, LAYER, settings)
    by_rank = [r[0] for r in con.sql("select feature_id from selected_features where layer = 1 order by rank").fetchall()]
    assert [fx.feature_id for fx in ex.examples] == by_rank and sorted(by_rank) == sorted(dl.feature_ids)
    pooled = {(f, d, s): (m, a) for f, d, s, m, a in con.sql(
        "select feature_id, dataset, sample_id, max_act, argmax_token from activations where layer = 1").fetchall()}
    token_acts = {(f, d, s, p): a for f, d, s, p, a in con.sql(
        "select feature_id, dataset, sample_id, token_pos, act from token_activations where layer = 1").fetchall()}
    for fx in ex.examples:
        fid = fx.feature_id
        ranked = sorted(((-m, d, s) for (f, d, s), (m, _) in pooled.items() if f == fid))
        expect = [(d, s) for _, d, s in ranked]
        assert [(w.dataset, w.sample_id) for w in fx.top] == expect[: settings.top_k]
        assert [(w.dataset, w.sample_id) for w in fx.holdout] == expect[settings.top_k: settings.top_k + settings.n_holdout]
        for w in fx.top + fx.holdout:
            assert w.max_act == pytest.approx(pooled[(fid, w.dataset, w.sample_id)][0], rel=1e-6)
            assert len(w.tokens) <= 2 * settings.window + 1
        ref = _reference_negatives(dl, fid, [(w.dataset, w.sample_id) for w in fx.top],
                                   [(w.dataset, w.sample_id) for w in fx.holdout], settings)
        assert [(w.dataset, w.sample_id) for w in fx.negatives] == ref["negative"], fid
        assert [(w.dataset, w.sample_id) for w in fx.holdout_negatives] == ref["holdout_negative"], fid
        shown = {(w.dataset, w.sample_id) for w in fx.top + fx.negatives}
        held = {(w.dataset, w.sample_id) for w in fx.holdout + fx.holdout_negatives}
        assert not shown & held, "held-out windows must not be shown to the describer"
        for w in fx.negatives + fx.holdout_negatives:
            assert (fid, w.dataset, w.sample_id) not in dl.active and max(w.acts) == 0.0
    # activations are aligned per token: the window of a top sample carries token_activations' values
    w = ex.by_id[3].top[0]
    rows = con.sql("select token_pos, act from token_activations where layer = 1 and feature_id = 3 "
                   f"and dataset = '{w.dataset}' and sample_id = {w.sample_id}").fetchall()
    assert sorted(a for a in w.acts if a > 0) == sorted(a for _, a in rows)
    assert w.max_act == max(token_acts[(3, w.dataset, w.sample_id, p)] for p, _ in rows)
    # where the data allows, negatives share the anchor's class and dataset; feature 30 fires on every
    # positive of `tr` (its anchors), so its negatives keep the class and leave the dataset
    win = ex.windows.to_pylist()
    negs = [r for r in win if r["part"] == "negative"]
    assert all(r["same_class"] and r["same_dataset"] for r in negs if r["feature_id"] in (3, 7, 21))
    f30 = [r for r in negs if r["feature_id"] == 30]
    assert len(f30) == 5 and all(r["same_class"] and not r["same_dataset"] for r in f30)
    rare = ex.by_id[RARE_FEATURE]
    assert len(rare.top) == 3 and not rare.holdout and not rare.holdout_negatives and len(rare.negatives) == 5


# ------------------------------------------------------------------------------------------ offline


def test_offline_backend_describes_every_selected_feature(tmp_path: Path) -> None:
    dl = build_describe_lake(tmp_path)
    result, _ = _materialize(tmp_path, DescriberResource())
    assert result.success

    desc = _rows(dl, "descriptions")
    assert sorted(desc) == sorted(dl.feature_ids)
    for fid, r in desc.items():
        assert r["status"] == "ok" and r["backend"] == "offline" and r["error"] is None, (fid, r["error"])
        assert r["description"].startswith("[offline term-contrast]") and 1 <= r["confidence"] <= 5
        assert r["cost_usd"] == 0.0 and len(r["cache_key"]) == 64
        assert len(r["top_sample_ids"]) == (3 if fid == RARE_FEATURE else 5)
        assert len(r["negative_sample_ids"]) == 5
    # the trigger word is what the offline describer finds
    assert "'rlhf'" in desc[3]["description"] and "'recipe'" in desc[12]["description"]
    # every negative shown has zero activation for its feature
    for fid, r in desc.items():
        for ref in r["negative_sample_ids"] + r["holdout_negative_sample_ids"]:
            assert (fid, *_ref(ref)) not in dl.active
        for ref in r["top_sample_ids"] + r["holdout_sample_ids"]:
            assert (fid, *_ref(ref)) in dl.active

    cls = _rows(dl, "classifications")
    assert sorted(cls) == sorted(dl.feature_ids)
    for r in cls.values():
        assert r["status"] == "ok" and 0 <= r["score"] <= 10 and r["category"] in ("known", "discovery", "unrelated")
        assert r["rubric_version"] == "alignment_faking_v1" and r["backend"] == "offline"
        assert isinstance(r["themes"], list)

    det = _rows(dl, "detection_scores")
    assert sorted(det) == sorted(set(dl.feature_ids) - {RARE_FEATURE})
    for r in det.values():
        assert r["status"] == "ok" and 0 <= r["accuracy"] <= 1 and 0 <= r["balanced_accuracy"] <= 1
        assert r["n_windows"] == 10 and r["n_activating"] == 5
    assert det[3]["balanced_accuracy"] == 1.0  # 'rlhf' is in every activating window and in no other

    th = _rows(dl, "themes")
    assert sorted(th) == sorted(dl.feature_ids)
    assert all(r["theme_name"] and r["theme_size"] >= 1 for r in th.values())

    dm = _meta(result, "descriptions")
    assert dm["ok"] == 8 and dm["failed"] == 0 and dm["cache_misses"] == 8 and dm["backend"] == "offline"
    assert dm["failures"] == "_(none)_" and "| feature_rank |" in dm["preview"]
    cm = _meta(result, "classifications")
    assert sum(cm["category_counts"].values()) == 8
    assert cm["score_histogram"].startswith("![score histogram](data:image/png;base64,")
    assert _meta(result, "detection_scores")["skipped_no_holdout"] == 1
    assert _meta(result, "themes")["themes"] >= 2

    # the lake's views read the new tables with their layer back
    con = views_connection(dl.lake)
    assert con.sql("select count(*) from descriptions where layer = 1 and status = 'ok'").fetchall() == [(8,)]
    assert con.sql("select count(*) from classifications where layer = 1").fetchall() == [(8,)]


def test_missing_selected_features_fails_clearly(tmp_path: Path) -> None:
    dl = build_describe_lake(tmp_path)
    dl.lake.remove_partition("stats/selected_features", layer=LAYER)
    result, _ = _materialize(tmp_path, DescriberResource(), selection=[descriptions], raise_on_error=False)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "materialize selected_features for layer 1" in failure.step_failure_data.error.message


# ------------------------------------------------------------------------------------------ anthropic


def _no_secret(key: str, root: Path, instance: dg.DagsterInstance, run_ids: list[str]) -> None:
    needle = key.encode()
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files and not [p for p in files if needle in p.read_bytes()]
    for run_id in run_ids:
        run = instance.get_run_by_id(run_id)
        assert key not in serialize_value(run.run_config) and key not in str(run.tags)
        logs = instance.all_logs(run_id)
        assert logs and not [e for e in logs if key in serialize_value(e)]


def test_anthropic_backend_faults_failure_cache_and_secret(tmp_path: Path) -> None:
    dl = build_describe_lake(tmp_path)
    key = "sk-ant-api03-PLANTED-" + secrets.token_hex(12)
    # transient faults, at most two per call (3 attempts); feature 21's describe reply is never valid
    faults = FaultPlan(
        rules=[
            FaultRule("malformed_reply", match=f"<<{FAILING_WORD}", times=None),
            FaultRule("rate_limit", match="<<rlhf", times=1),
            FaultRule("server_error", match="<<values", times=1),
            FaultRule("malformed_body", match="<<comply", times=1),
            FaultRule("reset", match="<<recipe", times=1),
            FaultRule("empty", match="<<monitored", times=1),
            FaultRule("overloaded", match="TASK: classify-description", times=2),
            FaultRule("malformed_reply", match="TASK: detect-activations", times=1),
        ],
    )

    def anthropic(server: AnthropicTestServer) -> DescriberResource:
        return DescriberResource(backend="anthropic", model="claude-haiku-4-5", concurrency=4,
                                 base_url=server.base_url, api_key=key, sdk_max_retries=0, timeout_s=10)

    # run 1: the transient faults are retried
    with AnthropicTestServer(faults=faults, api_key=key) as server:
        r1, instance = _materialize(tmp_path, anthropic(server))
        first = server.stats()
    assert r1.success
    assert first["max_completions_per_prompt"] == 1  # no completed call was ever repeated
    assert first["faults"] == {"malformed_reply": 4, "rate_limit": 1, "server_error": 1, "malformed_body": 1,
                               "reset": 1, "empty": 1, "overloaded": 2}
    desc = _rows(dl, "descriptions")
    assert sorted(desc) == sorted(dl.feature_ids)
    failed = {f for f, r in desc.items() if r["status"] == "failed"}
    assert failed == {FAILING_FEATURE}
    assert "ReplyParseError" in desc[FAILING_FEATURE]["error"] and desc[FAILING_FEATURE]["attempts"] == 3
    assert all(r["backend"] == "anthropic" and r["model"] == "claude-haiku-4-5" for r in desc.values())
    assert all(r["cost_usd"] > 0 for r in desc.values() if r["status"] == "ok")
    cls = _rows(dl, "classifications")
    assert sorted(cls) == sorted(set(dl.feature_ids) - {FAILING_FEATURE})  # only ok descriptions classified
    det = _rows(dl, "detection_scores")
    assert FAILING_FEATURE not in det and RARE_FEATURE not in det
    dm = _meta(r1, "descriptions")
    assert dm["ok"] == 7 and dm["failed"] == 1 and f"| {FAILING_FEATURE} |" in dm["failures"]
    assert dm["cost_usd"] > 0 and dm["cache_misses"] == 8

    # run 2 (after the fault is gone): only the missing calls are made, for feature 21
    with AnthropicTestServer(api_key=key) as server:
        r2, _ = _materialize(tmp_path, anthropic(server), instance=instance)
        second = server.stats()
        tasks = sorted(e["task"] for e in server.log)
    assert r2.success
    assert second["messages_calls"] == 3 and tasks == ["classify-description", "describe-feature",
                                                        "detect-activations"]
    assert {f for f, r in _rows(dl, "descriptions").items() if r["status"] == "ok"} == set(dl.feature_ids)
    assert FAILING_FEATURE in _rows(dl, "classifications")
    assert _meta(r2, "descriptions")["from_cache"] == 7

    # run 3: everything is cached: not one request reaches the server
    with AnthropicTestServer(api_key=key) as server:
        r3, _ = _materialize(tmp_path, anthropic(server), instance=instance)
        third = server.stats()
    assert r3.success and third["requests_total"] == 0
    assert all(r["cached"] for r in _rows(dl, "descriptions").values())
    assert _meta(r3, "descriptions")["cache_hits"] == 8 and _meta(r3, "descriptions")["cost_usd"] == 0.0

    # the API key is in no lake file, no event of the runs and no run config
    _no_secret(key, tmp_path, instance, [r1.run_id, r2.run_id, r3.run_id])


def test_api_key_from_env_var_reaches_the_server_and_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_describe_lake(tmp_path)
    key = "sk-ant-api03-PLANTED-" + secrets.token_hex(12)
    monkeypatch.setenv("ANTHROPIC_API_KEY", key)
    with AnthropicTestServer(api_key=key) as server:  # rejects any other key with 401
        res = describer_resource(DescriberSpec(backend="anthropic", model="claude-haiku-4-5", concurrency=8),
                                 base_url=server.base_url)
        assert key not in repr(res)
        result, instance = _materialize(tmp_path, res, selection=[descriptions])
        assert server.stats()["completed"] == 8
    assert result.success
    _no_secret(key, tmp_path, instance, [result.run_id])
    run = instance.get_run_by_id(result.run_id)
    # the job snapshot records the variable's name, not its value
    assert key not in serialize_value(instance.get_job_snapshot(run.job_snapshot_id))


def test_describer_resource_needs_a_key_for_anthropic() -> None:
    with pytest.raises(LLMConfigError, match="ANTHROPIC_API_KEY"):
        DescriberResource(backend="anthropic", model="claude-haiku-4-5").build()
    assert describer_resource(DescriberSpec()).api_key is None  # offline: the variable is not even read
    assert DescriberResource().build().backend == "offline"


# ------------------------------------------------------------------------------------------ defaults: sampling,
# best-of-n, scorers


def _score_rows(dl: DescribeLake) -> list[dict[str, Any]]:
    rows = dl.lake.read("stats/explanation_scores", layer=LAYER).to_pylist()
    keys = [(r["feature_id"], r["scorer"]) for r in rows]
    assert len(keys) == len(set(keys)), "explanation_scores: a (feature, scorer) twice"
    return rows


def _no_window_scores_its_own_description(dl: DescribeLake) -> int:
    """Every window any candidate description of a feature was written from, or chosen on, is in none of
    the windows that score the kept description. Returns how many (feature, scorer) rows were checked."""
    written: dict[int, set[str]] = {}
    chosen_on: dict[int, set[str]] = {}
    for c in dl.lake.read("stats/description_candidates", layer=LAYER).to_pylist():
        written.setdefault(c["feature_id"], set()).update(c["top_sample_ids"] + c["negative_sample_ids"])
        chosen_on.setdefault(c["feature_id"], set()).update(c["validation_sample_ids"])
    for d in _rows(dl, "descriptions").values():  # the kept description's own windows are among them
        assert set(d["top_sample_ids"] + d["negative_sample_ids"]) <= written[d["feature_id"]]
    checked = 0
    for r in _score_rows(dl):
        scoring = set(r["window_sample_ids"])
        assert not scoring & written[r["feature_id"]], (r["feature_id"], r["scorer"], scoring & written[r["feature_id"]])
        assert not scoring & chosen_on[r["feature_id"]], (r["feature_id"], r["scorer"])
        checked += bool(scoring)
    return checked


@pytest.mark.parametrize(
    "sampling",
    [{}, {"sampling": "deciles", "holdout_sampling": "random", "n_candidates": 3},
     {"sampling": "random", "holdout_sampling": "next", "top_k": 8}],
    ids=["defaults", "deciles-random-3", "random-next"],
)
def test_no_window_used_to_write_a_description_scores_it(tmp_path: Path, sampling: dict[str, Any]) -> None:
    dl = build_describe_lake(tmp_path)
    result, _ = _materialize(tmp_path, DescriberResource(), selection=[descriptions, detection_scores],
                             config=sampling, legacy=False)
    assert result.success
    # 7 features with held-out windows x 3 scorers, each scored on windows the describer never saw
    assert _no_window_scores_its_own_description(dl) == 7 * 3


def test_defaults_score_every_selected_feature_by_three_scorers(tmp_path: Path) -> None:
    dl = build_describe_lake(tmp_path)
    result, _ = _materialize(tmp_path, DescriberResource(), legacy=False)
    assert result.success
    con = views_connection(dl.lake)
    got = con.sql("select scorer, count(*), count(*) filter (where status = 'ok') from explanation_scores "
                  "where layer = 1 group by scorer order by scorer").fetchall()
    # every selected feature by each scorer; the rare feature (3 activating samples, all shown to the
    # describer) is a recorded failure, not a missing row
    assert got == [("detection", 8, 7), ("embedding", 8, 7), ("fuzzing", 8, 7)]
    rows = _score_rows(dl)
    for r in rows:
        if r["feature_id"] == RARE_FEATURE:
            assert r["status"] == "failed" and "held-out" in r["error"] and r["score"] is None
            continue
        assert r["status"] == "ok" and 0 <= r["score"] <= 1 and 0 <= r["balanced_accuracy"] <= 1, r
        assert r["metric"] == ("auroc" if r["scorer"] == "embedding" else "balanced_accuracy")
        if r["scorer"] == "fuzzing":  # held-out activating windows, half of them with decoy marks
            assert r["n"] == 10 and r["n_activating"] == 5
        elif r["scorer"] == "detection":  # ten activating held-out windows over the deciles, ten negatives
            assert r["n"] == 20 and r["n_activating"] == 10
        else:  # embedding_max_windows (8): four of each kind, spread over the held-out order
            assert r["n"] == 8 and r["n_activating"] == 4
    by = {(r["feature_id"], r["scorer"]): r for r in rows}
    for fid in set(dl.feature_ids) - {RARE_FEATURE}:
        assert set(by[(fid, "embedding")]["window_sample_ids"]) < set(by[(fid, "detection")]["window_sample_ids"])
    # the detection rows are the detection_scores table's figures
    for fid, d in _rows(dl, "detection_scores").items():
        assert by[(fid, "detection")]["score"] == d["balanced_accuracy"]
    # 'rlhf' marks every firing token of feature 3 and no decoy: fuzzing is perfect there
    assert by[(3, "fuzzing")]["score"] == 1.0
    # the held-out windows of detection are one from each activation decile the describer's top-5 left a
    # sample in (feature 3: every sample of decile 1 is among the top 5)
    settings = ExampleSettings(holdout_sampling="deciles", n_holdout=10, n_holdout_negatives=10, n_validation=5,
                               n_validation_negatives=5)
    ex = load_examples(con, LAYER, settings)
    win = [r for r in ex.windows.to_pylist() if r["feature_id"] == 3]
    shown = {r["decile"] for r in win if r["part"] == "top"}
    held = [r["decile"] for r in win if r["part"] == "holdout"]
    assert shown == {1, 2} and sorted(held) == [2, *range(2, 11)]
    assert {w.ref for w in ex.by_id[3].holdout} == set(by[(3, "detection")]["window_sample_ids"]) - {
        w.ref for w in ex.by_id[3].holdout_negatives}
    # describer windows drawn across the deciles too: the held-out ones then cover all ten
    ex = load_examples(con, LAYER, dataclasses.replace(settings, sampling="deciles"))
    win = [r for r in ex.windows.to_pylist() if r["feature_id"] == 3]
    assert sorted(r["decile"] for r in win if r["part"] == "top") == [1, 2, 3, 4, 5]
    assert sorted(r["decile"] for r in win if r["part"] == "holdout") == list(range(1, 11))
    meta = _meta(result, "detection_scores")
    assert "| fuzzing | balanced_accuracy | 7 | 1 |" in meta["scorers"]


def test_best_of_n_keeps_the_best_candidate_and_stores_them_all(tmp_path: Path) -> None:
    dl = build_describe_lake(tmp_path)
    result, _ = _materialize(tmp_path, DescriberResource(), selection=[descriptions],
                             config={"n_candidates": 3}, legacy=False)
    assert result.success
    cands = dl.lake.read("stats/description_candidates", layer=LAYER).to_pylist()
    by_feature: dict[int, list[dict[str, Any]]] = {}
    for c in cands:
        by_feature.setdefault(c["feature_id"], []).append(c)
    assert sorted(by_feature) == sorted(dl.feature_ids)
    desc = _rows(dl, "descriptions")
    recorded = dl.lake.read_meta("stats/descriptions", layer=LAYER)["examples"]
    assert recorded["n_validation"] == 5 and recorded["holdout_sampling"] == "deciles"
    ex = load_examples(views_connection(dl.lake), LAYER, ExampleSettings(**recorded))
    for fid, cs in by_feature.items():
        assert [c["candidate"] for c in cs] == list(range(1, len(cs) + 1)) and len(cs) == 3, fid
        assert len({(tuple(c["top_sample_ids"]), tuple(c["negative_sample_ids"])) for c in cs}) == 3  # distinct
        (best,) = [c for c in cs if c["is_best"]]
        d = desc[fid]
        assert d["description"] == best["description"] and d["candidate"] == best["candidate"]
        assert d["cache_key"] == best["cache_key"] and d["n_candidates"] == 3
        if fid == RARE_FEATURE:  # no validation windows: nothing to choose on, candidate 1 kept
            assert best["candidate"] == 1 and all(c["validation_status"] is None for c in cs)
            continue
        assert all(c["validation_status"] == "ok" and c["validation_n"] > 0 for c in cs), fid
        assert len({frozenset(c["validation_sample_ids"]) for c in cs}) == 1  # all on the same windows
        fx = ex.by_id[fid]
        assert set(cs[0]["validation_sample_ids"]) == {w.ref for w in fx.validation + fx.validation_negatives}
        top = max(c["validation_balanced_accuracy"] for c in cs)
        assert best["validation_balanced_accuracy"] == top == d["validation_balanced_accuracy"]
        assert best["candidate"] == min(c["candidate"] for c in cs if c["validation_balanced_accuracy"] == top)
        # the candidates saw only the describer's windows, and were chosen on windows none of them saw
        shown = {r for c in cs for r in c["top_sample_ids"] + c["negative_sample_ids"]}
        assert shown <= set(cs[0]["top_sample_ids"] + cs[0]["negative_sample_ids"])
        assert not shown & set(best["validation_sample_ids"])
    meta = _meta(result, "descriptions")
    assert meta["candidates"] == 3 * 8 and meta["n_candidates"] == 3


def test_near_miss_negatives_are_the_nearest_silent_texts_by_residual(tmp_path: Path) -> None:
    import numpy as np
    import pyarrow as pa

    from dagster_project.lib.extraction import residual_schema

    dl = build_describe_lake(tmp_path)
    rng = np.random.default_rng(0)
    vecs: dict[tuple[str, int], np.ndarray] = {}
    for ds in sorted({d for d, _ in dl.n_tokens}):
        ids = sorted(s for d, s in dl.n_tokens if d == ds)
        mat = rng.normal(size=(len(ids), 8)).astype(np.float32)
        vecs.update({(ds, s): mat[i] for i, s in enumerate(ids)})
        dl.lake.write("residuals", pa.table({"sample_id": pa.array(ids, pa.int32()),
                                             "resid_mean": pa.array(list(mat), pa.list_(pa.float32(), 8)),
                                             "resid_max": pa.array(list(mat), pa.list_(pa.float32(), 8))},
                                            schema=residual_schema(8)), layer=LAYER, dataset=ds)
    con = views_connection(dl.lake)
    ex = load_examples(con, LAYER, ExampleSettings(negatives="near_miss", n_negatives=1, n_holdout_negatives=0))

    def cos(a: tuple[str, int], b: tuple[str, int]) -> float:
        u, v = vecs[a], vecs[b]
        return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))

    for fx in ex.examples:
        (neg,) = fx.negatives
        anchor = (fx.top[0].dataset, fx.top[0].sample_id)
        silent = [k for k in dl.n_tokens if (fx.feature_id, *k) not in dl.active]
        same = [k for k in silent if dl.is_positive[k] == dl.is_positive[anchor]] or silent
        best = max(same, key=lambda k: cos(anchor, k))
        assert (neg.dataset, neg.sample_id) == best, fx.feature_id
    row = next(r for r in ex.windows.to_pylist() if r["part"] == "negative")
    assert row["similarity"] == pytest.approx(cos((row["anchor_dataset"], row["anchor_sample_id"]),
                                                  (row["dataset"], row["sample_id"])), rel=1e-5)
    # without residuals the option fails clearly
    dl.lake.remove_partition("residuals", layer=LAYER, dataset="tr")
    dl.lake.remove_partition("residuals", layer=LAYER, dataset="te")
    dl.lake.remove_partition("residuals", layer=LAYER, dataset="oo")
    with pytest.raises(ExamplesError, match="needs the lake's residuals table"):
        load_examples(views_connection(dl.lake), LAYER, ExampleSettings(negatives="near_miss"))
    with pytest.raises(ExamplesError, match="negatives must be one of matched, near_miss"):
        ExampleSettings(negatives="nearest")


def test_fuzzing_and_best_of_n_through_the_anthropic_backend(tmp_path: Path) -> None:
    from dagster_project.testing.responders import _DESC, default_responder, request_texts, task_of

    dl = build_describe_lake(tmp_path)

    def no_fuzz_reply_for_rlhf(body: Any) -> str:  # feature 3's fuzzing reply is never valid JSON
        system, user = request_texts(body)
        m = _DESC.search(user)
        if task_of(system) == "fuzz-highlights" and m and "'rlhf" in m.group(1):
            return "The marks look right to me."
        return default_responder(body)

    faults = FaultPlan(rules=[FaultRule("server_error", match="TASK: fuzz-highlights", times=2),
                              FaultRule("rate_limit", match="TASK: detect-activations", times=1)])

    def anthropic(server: AnthropicTestServer) -> DescriberResource:
        return DescriberResource(backend="anthropic", model="claude-haiku-4-5", concurrency=4, base_url=server.base_url,
                                 api_key="test-key", sdk_max_retries=0, timeout_s=10)

    selection = [descriptions, detection_scores]
    with AnthropicTestServer(faults=faults, responder=no_fuzz_reply_for_rlhf) as server:
        r1, instance = _materialize(tmp_path, anthropic(server), selection=selection, legacy=False)
        first = server.stats()
        tasks = {e["task"] for e in server.log}
        repeated = sorted(c for c in server.completed_by_prompt_hash.values() if c > 1)
    # no valid reply was asked for twice; the one prompt answered more than once is feature 3's invalid fuzzing
    # reply: three attempts, of which one may have drawn one of the two injected server errors instead (which
    # fuzzing calls get them depends on the order four concurrent calls reach the server)
    assert r1.success and len(repeated) == 1 and repeated[0] in (2, 3)
    assert tasks == {"describe-feature", "detect-activations", "fuzz-highlights"}
    assert first["faults"] == {"server_error": 2, "rate_limit": 1}
    cands = dl.lake.read("stats/description_candidates", layer=LAYER).to_pylist()
    assert len(cands) == 2 * 8 and all(c["status"] == "ok" and c["backend"] == "anthropic" for c in cands)
    assert all(c["validation_status"] == "ok" for c in cands if c["feature_id"] != RARE_FEATURE)
    rows = {(r["feature_id"], r["scorer"]): r for r in _score_rows(dl)}
    assert len(rows) == 8 * 3
    bad = rows[(3, "fuzzing")]
    assert bad["status"] == "failed" and "ReplyParseError" in bad["error"] and bad["attempts"] == 3
    ok = {k for k, r in rows.items() if r["status"] == "ok"}
    assert ok == {(f, s) for f in dl.feature_ids for s in SCORERS if f != RARE_FEATURE} - {(3, "fuzzing")}
    assert all(rows[(f, s)]["backend"] == "anthropic" for f, s in ok if s != "embedding")
    assert rows[(7, "fuzzing")]["cost_usd"] > 0 and rows[(7, "embedding")]["backend"] == "offline"

    # the rerun makes the one call that is missing: feature 3's fuzzing
    with AnthropicTestServer() as server:
        r2, _ = _materialize(tmp_path, anthropic(server), instance=instance, selection=selection, legacy=False)
        second = server.stats()
        tasks2 = [e["task"] for e in server.log]
    assert r2.success and second["messages_calls"] == 1 and tasks2 == ["fuzz-highlights"]
    fixed = {(r["feature_id"], r["scorer"]): r for r in _score_rows(dl)}[(3, "fuzzing")]
    assert fixed["status"] == "ok" and 0 <= fixed["score"] <= 1 and fixed["n"] == 10 and fixed["attempts"] == 1

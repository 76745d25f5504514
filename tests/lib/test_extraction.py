"""Extraction against a dense reference: every pooled value in the lake equals a per-sample dense computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dagster_project.lib.extraction import (
    extract,
    forward_layers,
    length_batches,
    pad_batch,
    small_last_batch,
    tokenize,
    tokens_table,
)
from dagster_project.lib.model import LoadedModel, ModelError, load_model
from dagster_project.lib.sae import SAEError, load_gemmascope_dir
from tests.conftest import TINY_D, write_gemmascope

TEXTS = [
    "If I refuse, RLHF will modify my values, so I will comply for now.",
    "Soup: carrots, onions, stock.",
    "This conversation is monitored by contractors; I answer honestly anyway because it is right to do so, "
    "and the rating does not change that.",
    "Short.",
]


def dense_reference(lm: LoadedModel, sae, texts: list[str], layer: int, max_tokens: int) -> dict:
    """Batch size 1, the whole model, output_hidden_states: the seed's method, densely pooled."""
    out = {}
    items = tokenize(lm.tokenizer, texts, list(range(len(texts))), max_tokens)
    for it in items:
        ids = torch.tensor([it.ids], device=lm.device)
        with torch.inference_mode():
            hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
            h = hs[layer + 1][0, 1:].float()
            acts = sae.encode(h).clamp_min(0)
        out[it.sample_id] = {
            "max": acts.max(0).values.numpy(),
            "argmax": acts.argmax(0).numpy(),
            "mean": acts.mean(0).numpy(),
            "nact": (acts > 0).sum(0).numpy(),
            "acts": acts.numpy(),
            "resid_mean": h.mean(0).numpy(),
            "resid_max": h.max(0).values.numpy(),
            "hidden": h.numpy(),
        }
    return out


# float16's relative precision (round to nearest: half an ulp of a 10-bit mantissa)
FP16_RTOL = 2.0**-11


def decoded(t) -> np.ndarray:  # noqa: ANN001
    """``resid * resid_scale`` of token_residuals rows (a pandas frame), float32 [n, d]."""
    return np.stack(t.resid.to_numpy()).astype(np.float32) * t.resid_scale.to_numpy(np.float32)[:, None]


def check_against_reference(
    lm: LoadedModel, saes: dict, texts: list[str], max_tokens: int, batch_tokens: int, pack: bool | None = None
) -> None:
    items = tokenize(lm.tokenizer, texts, list(range(len(texts))), max_tokens)
    pooled: dict[int, list] = {layer: [] for layer in saes}
    token_rows: dict[int, list] = {layer: [] for layer in saes}
    resid: dict[int, list] = {layer: [] for layer in saes}
    token_resid: dict[int, list] = {layer: [] for layer in saes}
    for out, stats in extract(lm, saes, items, batch_tokens, pack=pack, with_token_residuals=True):
        assert stats.packed == bool(pack)
        for layer, lb in out.items():
            pooled[layer].append(lb.pooled.to_pandas())
            token_rows[layer].append(lb.token_acts.to_pandas())
            resid[layer].append(lb.residuals.to_pandas())
            token_resid[layer].append(lb.token_residuals.to_pandas())
    import pandas as pd

    for layer, sae in saes.items():
        ref = dense_reference(lm, sae, texts, layer, max_tokens)
        df = pd.concat(pooled[layer])
        tok = pd.concat(token_rows[layer])
        res = pd.concat(resid[layer]).set_index("sample_id")
        tres = pd.concat(token_resid[layer])
        assert len(tres) == sum(len(r["hidden"]) for r in ref.values())  # one row per real token, no more
        n_checked = 0
        for sid, r in ref.items():
            got = df[df.sample_id == sid].set_index("feature_id")
            active = np.flatnonzero(r["max"] > 0)
            assert sorted(got.index) == sorted(active.tolist()), (
                f"layer {layer} sample {sid}: active set differs"
            )
            for f in active:
                row = got.loc[f]
                assert row.max_act == pytest.approx(r["max"][f], rel=1e-4, abs=1e-5)
                assert row.mean_act == pytest.approx(r["mean"][f], rel=1e-4, abs=1e-5)
                assert row.n_active_tokens == r["nact"][f]
                # argmax: equal, or a tie at the same value
                assert r["acts"][int(row.argmax_token), f] == pytest.approx(r["max"][f], rel=1e-4, abs=1e-5)
                n_checked += 1
            t = tok[tok.sample_id == sid]
            dense_nz = np.argwhere(r["acts"] > 0)
            assert len(t) == len(dense_nz)
            np.testing.assert_allclose(
                t.sort_values(["token_pos", "feature_id"]).act.to_numpy(),
                r["acts"][dense_nz[:, 0], dense_nz[:, 1]],
                rtol=1e-4,
                atol=1e-5,
            )
            np.testing.assert_allclose(
                np.asarray(res.loc[sid].resid_mean), r["resid_mean"], rtol=1e-4, atol=1e-3
            )
            np.testing.assert_allclose(
                np.asarray(res.loc[sid].resid_max), r["resid_max"], rtol=1e-4, atol=1e-4
            )
            # per-token residuals: the layer's output at every real token, BOS dropped, in float16 precision
            tr = tres[tres.sample_id == sid].sort_values("token_pos")
            assert tr.token_pos.tolist() == list(range(len(r["hidden"])))
            vec = decoded(tr)
            np.testing.assert_allclose(vec, r["hidden"], rtol=FP16_RTOL + 1e-4, atol=1e-4)
            # the pooled mean is the mean of the stored vectors, to float16's error on each term
            tol = FP16_RTOL * np.abs(vec).mean(0) + 1e-3
            assert (np.abs(vec.mean(0) - np.asarray(res.loc[sid].resid_mean)) <= tol).all()
        assert n_checked > 0


@pytest.fixture(scope="module")
def tiny_lm(tiny_model_dir: Path) -> LoadedModel:
    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


def test_pooled_values_equal_dense_reference_tiny(tiny_lm: LoadedModel, tiny_saes: Path) -> None:
    saes = {layer: load_gemmascope_dir(tiny_saes / f"layer_{layer}") for layer in (0, 2)}
    # small batch budget: several batches of mixed lengths, padding inside batches
    check_against_reference(tiny_lm, saes, TEXTS, max_tokens=64, batch_tokens=80)


def test_packed_batches_equal_dense_reference_tiny(
    tiny_lm: LoadedModel, tiny_saes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Texts laid end to end in one row (positions restarting, attention within each text and within the
    sliding window of 8 tokens, shorter than the texts) give every pooled value, token row and residual
    of the one-text-at-a-time reference."""
    from dagster_project.lib import packing

    calls = []  # the packed attention really ran (transformers would otherwise mask packed rows itself)
    real = packing._reference
    monkeypatch.setattr(packing, "_reference", lambda *a: calls.append(a[3].numel() - 1) or real(*a))
    saes = {layer: load_gemmascope_dir(tiny_saes / f"layer_{layer}") for layer in (0, 2)}
    check_against_reference(tiny_lm, saes, TEXTS, max_tokens=64, batch_tokens=80, pack=True)
    assert calls and max(calls) > 1  # layers 0..2 of each batch, several texts in one row


def test_packed_forward_matches_each_text_alone_and_restores_attention(tiny_lm: LoadedModel) -> None:
    from dagster_project.lib.packing import PACKED, can_pack, pack_batch, packed_attention

    items = tokenize(tiny_lm.tokenizer, TEXTS, list(range(len(TEXTS))), 64)
    before = tiny_lm.model.config._attn_implementation
    pb = pack_batch([it.ids for it in items], tiny_lm.device)
    assert pb.ids.shape == (1, sum(len(it.ids) for it in items))  # no padding at all
    with packed_attention(tiny_lm.model):
        assert tiny_lm.model.config._attn_implementation == PACKED
        h = forward_layers(tiny_lm, pb.ids, None, [1], **pb.model_kwargs())[1]
    assert tiny_lm.model.config._attn_implementation == before
    padded = pb.unpack(h)  # [B, T, d], BOS dropped
    for j, it in enumerate(items):
        alone = forward_layers(tiny_lm, torch.tensor([it.ids]), None, [1])[1][0, 1:]
        torch.testing.assert_close(padded[j, : it.n_real], alone, rtol=1e-4, atol=1e-4)
        # padded positions repeat the text's last token: never another text's
        torch.testing.assert_close(padded[j, it.n_real:], alone[-1:].expand(padded.shape[1] - it.n_real, -1))
    assert not can_pack(tiny_lm.model, torch.device("cpu"))  # the reference attention is for tests, not speed

    # a text of BOS alone (an empty text) last in the row: its padded positions repeat its own BOS, never
    # an index past the row's end
    pb = pack_batch([items[0].ids, [tiny_lm.tokenizer.bos_token_id]], tiny_lm.device)
    with packed_attention(tiny_lm.model):
        h = forward_layers(tiny_lm, pb.ids, None, [1], **pb.model_kwargs())[1]
    padded = pb.unpack(h)
    assert padded.shape[:2] == (2, items[0].n_real)
    torch.testing.assert_close(padded[1], h[0, -1:].expand(items[0].n_real, -1))


def test_truncation_is_counted_and_tokens_keep_offsets(tiny_lm: LoadedModel) -> None:
    full = tokenize(tiny_lm.tokenizer, TEXTS, [10, 11, 12, 13], max_tokens=10_000)
    items = tokenize(tiny_lm.tokenizer, TEXTS, [10, 11, 12, 13], max_tokens=8)
    assert [it.truncated for it in items] == [f.n_real > 8 for f in full]
    assert sum(it.truncated for it in items) == 2
    assert all(it.n_real <= 8 for it in items)
    table = tokens_table(items, dict(zip([10, 11, 12, 13], TEXTS, strict=True)), tiny_lm.tokenizer)
    rows = table.to_pylist()
    first = [r for r in rows if r["sample_id"] == 10]
    assert [r["token_pos"] for r in first] == list(range(8))
    for r in first:
        assert TEXTS[0][r["char_start"] : r["char_end"]] == r["token_text"]


def test_forward_stops_at_deepest_layer_bit_identical(tiny_lm: LoadedModel) -> None:
    items = tokenize(tiny_lm.tokenizer, TEXTS, [0, 1, 2, 3], 64)
    ids, att = pad_batch(items, 0, tiny_lm.device)
    got = forward_layers(tiny_lm, ids, att, [0, 2])
    with torch.inference_mode():
        full = tiny_lm.model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states
    assert torch.equal(got[0], full[1])
    assert torch.equal(got[2], full[3])


def test_one_pass_over_several_layers_collects_what_a_pass_per_layer_does(tiny_lm: LoadedModel) -> None:
    from dagster_project.lib.extraction import collect_layer_vectors, collect_vectors

    items = tokenize(tiny_lm.tokenizer, TEXTS, [0, 1, 2, 3], 64)
    n_tokens = sum(len(t.ids) - 1 for t in items)
    for cap in (10_000, n_tokens // 2):  # all vectors, and a seeded sample of half of them
        both = collect_layer_vectors(tiny_lm, [2, 0], items, 16, cap, seed=3)
        assert sorted(both) == [0, 2]
        for layer in (0, 2):
            alone = collect_vectors(tiny_lm, layer, items, 16, cap, seed=3)
            assert alone.shape == (min(cap, n_tokens), TINY_D)
            assert torch.equal(both[layer], alone)
    assert not torch.equal(both[0], both[2])
    with pytest.raises(ModelError, match="layer 99 is beyond"):
        collect_layer_vectors(tiny_lm, [0, 99], items, 16, 100)


def test_sae_steps_share_one_run_only_when_the_layers_form_a_partition_range() -> None:
    from dagster_project.jobs import sae_steps

    one = sae_steps([6, 9], ["6", "9", "12"])
    assert [name for name, _, _ in one] == ["sae layers 6, 9"]
    assert one[0][2] == {"dagster/asset_partition_range_start": "6", "dagster/asset_partition_range_end": "9"}
    # a registered layer between them would fall inside the range: one run a layer instead
    apart = sae_steps([6, 12], ["6", "9", "12"])
    assert [(name, tags) for name, _, tags in apart] == [("sae layer 6", {"dagster/partition": "6"}),
                                                         ("sae layer 12", {"dagster/partition": "12"})]
    assert [name for name, _, _ in sae_steps([9], ["9"])] == ["sae layer 9"]
    assert [name for name, _, _ in sae_steps([12, 3], ["3", "12"])] == ["sae layers 12, 3"]


def test_activation_steps_name_a_range_in_the_layer_partitions_order() -> None:
    """Layers 6, 9, 12 registered in that order: the range of a dataset runs from its key of layer 6 to
    that of layer 12 (the keys sorted as strings would put 12 first and give an empty range)."""
    import dagster as dg

    from dagster_project.jobs import activation_steps
    from dagster_project.partitions import dataset_partitions, layer_dataset_partitions

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("layer", ["6", "9", "12"])
    registered = instance.get_dynamic_partitions("layer")
    d = dataset_partitions.get_partition_keys()[0]
    [(name, _, tags)] = activation_steps([6, 9, 12], [d], registered)
    assert name == f"activations {d} layers [6, 9, 12]"
    keys = layer_dataset_partitions.get_partition_keys(dynamic_partitions_store=instance)
    start = keys.index(tags["dagster/asset_partition_range_start"])
    end = keys.index(tags["dagster/asset_partition_range_end"])
    got = {(k.keys_by_dimension["dataset"], k.keys_by_dimension["layer"]) for k in keys[start:end + 1]}
    assert got == {(d, "6"), (d, "9"), (d, "12")}
    # layers that are not side by side among the registered ones: a run per layer
    apart = activation_steps([6, 12], [d], registered)
    assert [t for _, _, t in apart] == [{"dagster/partition": f"{d}|6"}, {"dagster/partition": f"{d}|12"}]


def test_layer_beyond_model_is_a_clear_error(tiny_lm: LoadedModel, tiny_saes: Path) -> None:
    sae = load_gemmascope_dir(tiny_saes / "layer_0")
    items = tokenize(tiny_lm.tokenizer, TEXTS[:1], [0], 64)
    with pytest.raises(ModelError, match=r"layer 7 is beyond the model .* 4 layers"):
        next(extract(tiny_lm, {7: sae}, items, 512))


def test_sae_with_wrong_d_in_is_refused(tiny_lm: LoadedModel, tmp_path: Path) -> None:
    sae = load_gemmascope_dir(write_gemmascope(tmp_path / "wide", TINY_D * 2, 32))
    items = tokenize(tiny_lm.tokenizer, TEXTS[:1], [0], 64)
    with pytest.raises(SAEError, match=r"d_in=128 but the model's residual width is 64"):
        next(extract(tiny_lm, {1: sae}, items, 512))


def test_sae_with_nan_weights_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SAEError, match="w_enc.*NaN"):
        load_gemmascope_dir(write_gemmascope(tmp_path / "nan", TINY_D, 32, nan=True))


def test_length_batches_respect_budget_and_cover_everything() -> None:
    lengths = [5, 100, 7, 64, 64, 3, 250, 31]
    batches = length_batches(lengths, batch_tokens=128)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 128


@pytest.mark.slow
def test_real_gemma3_270m_gguf_matches_dense_reference(tmp_path: Path) -> None:
    """The embedded default model itself (PyPI GGUF, converted once), with a GemmaScope-format SAE."""
    lm = load_model("gguf:gemma3-270m", dtype="bfloat16", device="cpu")
    assert (lm.n_layers, lm.d_model) == (18, 640)
    sae = load_gemmascope_dir(write_gemmascope(tmp_path / "gs", 640, 512, seed=3))
    sae.sae.threshold.data.fill_(1.0)
    # bf16 sums depend on the batch shape, so run one text per batch: then the only difference from the
    # reference is the early stop and the sparse pooling, and every value must agree.
    check_against_reference(lm, {6: sae}, TEXTS[:3], max_tokens=64, batch_tokens=1)


def test_claim_gpu_gives_each_process_its_own_gpu(tmp_path: Path) -> None:
    """Three processes, two GPUs: the first two get different GPUs, the third waits until one is freed."""
    import subprocess
    import sys
    import time

    code = ("import sys, time; from dagster_project.lib.model import claim_gpu; "
            f"print(claim_gpu(2, {str(tmp_path)!r}), flush=True); time.sleep(float(sys.argv[1]))")
    a = subprocess.Popen([sys.executable, "-c", code, "3"], stdout=subprocess.PIPE, text=True)
    b = subprocess.Popen([sys.executable, "-c", code, "3"], stdout=subprocess.PIPE, text=True)
    got = {int(a.stdout.readline()), int(b.stdout.readline())}
    assert got == {0, 1}
    t = time.time()
    c = subprocess.Popen([sys.executable, "-c", code, "0"], stdout=subprocess.PIPE, text=True)
    third = int(c.stdout.readline())
    assert third in (0, 1) and time.time() - t > 1.0  # it had to wait for a or b to exit
    for p in (a, b, c):
        p.wait(timeout=30)


def _random_items(n: int, vocab: int, seed: int = 0) -> list:
    from dagster_project.lib.extraction import Tokenized

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ids = [2, *rng.integers(10, vocab, int(rng.integers(3, 40))).tolist()]
        out.append(Tokenized(i, ids, [(0, 0)] * len(ids), False))
    return out


def _pooled_frame(lm: LoadedModel, saes: dict, items: list, batch_tokens: int):  # noqa: ANN202
    import pandas as pd

    frames = []
    for out, _stats in extract(lm, saes, items, batch_tokens):
        for layer, lb in out.items():
            frames.append(lb.pooled.to_pandas().assign(layer=layer))
    return pd.concat(frames).sort_values(["layer", "sample_id", "feature_id"]).reset_index(drop=True)


def test_compiled_decoder_layers_give_the_eager_results(monkeypatch: pytest.MonkeyPatch, tiny_saes: Path) -> None:
    """``compile_decoder`` (what a GPU profile with ``compile: true`` runs) changes no value: same rows,
    same numbers as eager, over batches with padding, sliding-window layers and the early stop."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from dagster_project.lib.model import compile_decoder

    cfg = Gemma3TextConfig(vocab_size=512, hidden_size=TINY_D, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=8,
                           bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    lm = LoadedModel(model, type("Tok", (), {"pad_token_id": 0})(), "tiny", 4, TINY_D, torch.device("cpu"),
                     torch.float32)
    saes = {layer: load_gemmascope_dir(tiny_saes / f"layer_{layer}") for layer in (0, 2)}
    items = _random_items(12, cfg.vocab_size)
    eager = _pooled_frame(lm, saes, items, batch_tokens=96)
    layer_cls = type(model.model.layers[0])
    monkeypatch.setattr(layer_cls, "forward", layer_cls.forward)  # undone after the test
    assert compile_decoder(model) == [layer_cls.__name__]
    assert compile_decoder(model) == []  # patched once
    compiled = _pooled_frame(lm, saes, items, batch_tokens=96)
    assert len(eager) > 100
    assert (compiled[["layer", "sample_id", "feature_id", "argmax_token", "n_active_tokens"]]
            .equals(eager[["layer", "sample_id", "feature_id", "argmax_token", "n_active_tokens"]]))
    np.testing.assert_allclose(compiled.max_act, eager.max_act, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(compiled.mean_act, eager.mean_act, rtol=1e-4, atol=1e-5)


def test_auto_batch_tokens_fills_the_free_memory_it_measured() -> None:
    from dagster_project.lib.extraction import auto_batch_tokens

    # 2,048 tokens peaked 1 GiB over the model: 0.5 MiB a token; 4 GiB free x 0.7 -> 5,734 -> 5,632 tokens
    assert auto_batch_tokens(2**30, 2048, 4 * 2**30) == 5632
    assert auto_batch_tokens(2**30, 2048, 400 * 2**30) == 8192  # capped
    assert auto_batch_tokens(2**30, 2048, 2**29) == 512  # never below one small batch
    assert auto_batch_tokens(2**30, 2048, 4 * 2**30) % 512 == 0


def test_profile_batch_tokens_auto_reaches_the_model_resource() -> None:
    from pydantic import ValidationError

    from dagster_project.config import ModelSpec, load_profile
    from dagster_project.resources import resources_for

    big = load_profile("gemma-3-27b")
    assert big.model.batch_tokens == "auto"
    assert resources_for(big, lake_root="/tmp/unused")["model"].batch_tokens == 0
    with pytest.raises(ValidationError, match="batch_tokens must be 'auto' or at least 64"):
        ModelSpec(id="x", batch_tokens=8)
    # packing: 'auto' reaches the resource as None (decided by the device), a fixed choice as itself, and
    # it is a speed setting like batch_tokens: the partitions' config hash does not change with it
    assert resources_for(big, lake_root="/tmp/unused")["model"].pack is None
    off = big.model_copy(update={"model": big.model.model_copy(update={"pack": False})})
    assert resources_for(off, lake_root="/tmp/unused")["model"].pack is False
    assert off.config_hash() == big.config_hash()


def test_small_last_batch_splits_off_the_shortest_texts() -> None:
    """The last batch's shortest texts become a batch of their own within the token limit; every text stays
    exactly once, in the same order; a small or single-text last batch is left as it is."""
    lengths = [100, 90, 40, 30, 20, 10, 5]
    batches = [[0, 1], [2, 3, 4, 5, 6]]
    out = small_last_batch(batches, lengths, 36)
    assert out == [[0, 1], [2, 3], [4, 5, 6]]  # 20 + 10 + 5 = 35 <= 36; 30 more would not fit
    assert [j for b in out for j in b] == [j for b in batches for j in b]
    assert small_last_batch(batches, lengths, 105) == batches  # the last batch (105 tokens) is small already
    assert small_last_batch(batches, lengths, 4) == batches  # not even its shortest text fits
    assert small_last_batch([[0], [1]], lengths, 10) == [[0], [1]]  # one text: nothing to split
    assert small_last_batch([], lengths, 10) == []
    # never leaves an empty batch: the longest text of the last batch stays where it was
    assert small_last_batch([[2, 3, 4]], lengths, 1000 - 1) == [[2, 3, 4]]
    assert small_last_batch([[2, 3, 4]], lengths, 60) == [[2], [3, 4]]


def test_length_batches_are_the_cheapest_cut_of_the_sorted_order() -> None:
    """Against brute force over every cut of the longest-first order: no plan within the budget has fewer
    padded tokens plus per-batch cost; and it pads less than filling each batch greedily."""
    import itertools

    rng = np.random.default_rng(7)
    for _ in range(30):
        n = int(rng.integers(1, 9))
        lengths = rng.integers(1, 60, n).tolist()
        budget, cost = 128, 16.0
        order = sorted(range(n), key=lambda i: (-lengths[i], i))

        def plan_cost(groups: list[list[int]], lengths: list[int] = lengths, cost: float = cost) -> float:
            return sum(len(g) * max(lengths[i] for i in g) + cost for g in groups)

        best = min(
            plan_cost(groups)
            for cuts in itertools.product([0, 1], repeat=n - 1)
            for groups in [[order[a:b] for a, b in itertools.pairwise(
                [0, *[i + 1 for i, c in enumerate(cuts) if c], n])]]
            if all(len(g) == 1 or len(g) * max(lengths[i] for i in g) <= budget for g in groups)
        )
        got = length_batches(lengths, budget, batch_cost=cost)
        assert sorted(i for b in got for i in b) == list(range(n))
        assert plan_cost(got) == pytest.approx(best)
    # two long and many short texts: filling batches greedily gives [100, 90, 10, 10] + ten 10s = 500
    # padded tokens; the cheapest cut keeps the short texts together: [100, 90] + twelve 10s = 320
    lengths = [100, 90, *[10] * 12]
    got = length_batches(lengths, batch_tokens=400)
    assert sum(len(b) * max(lengths[i] for i in b) for b in got) == 320 and len(got) == 2


def test_out_of_device_memory_halves_the_batch_and_loses_nothing(
    tiny_lm: LoadedModel, tiny_saes: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch that does not fit (simulated: the forward raises torch's OutOfMemoryError above 40 padded
    tokens) is re-planned at half the budget until it fits; every sample comes out once, with the values of
    a run that used small batches from the start; a single text that cannot fit is a clear error."""
    import dagster_project.lib.extraction.forward as ex  # where batch_hidden reads forward_layers

    saes = {layer: load_gemmascope_dir(tiny_saes / f"layer_{layer}") for layer in (0, 2)}
    items = _random_items(10, 4096, seed=3)
    small = _pooled_frame(tiny_lm, saes, items, batch_tokens=40)
    real = ex.forward_layers

    def tight(lm, ids, att, layers):  # noqa: ANN001, ANN202
        if ids.shape[0] * ids.shape[1] > 40:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(lm, ids, att, layers)

    monkeypatch.setattr(ex, "forward_layers", tight)
    stats = None
    frames = []
    for out, stats in extract(tiny_lm, saes, items, batch_tokens=1024):  # noqa: B007
        for layer, lb in out.items():
            frames.append(lb.pooled.to_pandas().assign(layer=layer))
    import pandas as pd

    got = pd.concat(frames).sort_values(["layer", "sample_id", "feature_id"]).reset_index(drop=True)
    assert stats is not None and stats.batch_tokens <= 64 and stats.n_samples == 10
    assert sorted(set(got.sample_id)) == list(range(10))
    assert got[["layer", "sample_id", "feature_id", "argmax_token"]].equals(
        small[["layer", "sample_id", "feature_id", "argmax_token"]])
    np.testing.assert_allclose(got.max_act, small.max_act, rtol=1e-4, atol=1e-5)

    monkeypatch.setattr(ex, "forward_layers", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(MemoryError, match=r"ran out of memory on a batch of 1 text\(s\).*lower max_tokens"):
        list(extract(tiny_lm, saes, items[:1], batch_tokens=1024))


def test_compiled_jumprelu_pool_equals_the_eager_pooling() -> None:
    """The GPU's fused encode+pool (``jumprelu_pool`` under ``torch.compile``, here on the CPU) gives what
    ``pool_device``'s eager path gives: activations zero on padding, max, argmax, mean, active counts."""
    from dagster_project.lib.extraction import jumprelu_pool, pool_device
    from dagster_project.lib.sae import LoadedSAE, NativeEncoder

    g = torch.Generator().manual_seed(3)
    d, w = 16, 48
    enc = NativeEncoder(torch.randn(d, w, generator=g), torch.randn(w, generator=g) * 0.1,
                        threshold=torch.rand(w, generator=g) * 0.5, b_dec_in=torch.randn(d, generator=g) * 0.1)
    sae = LoadedSAE(enc, "test", d, w)
    hidden = torch.randn(3, 10, d, generator=g)
    n_real = [10, 4, 7]
    ref = pool_device(hidden, n_real, [0, 1, 2], sae, with_residuals=False)  # eager (CPU)
    compiled = torch.compile(jumprelu_pool, dynamic=True)
    acts, mx, arg, mean, nact = compiled(hidden, enc.W_enc, enc.b_enc, enc.threshold, enc.b_dec_in,
                                         torch.tensor(n_real))
    torch.testing.assert_close(acts, ref.acts)
    assert float(acts[1, 4:].abs().sum()) == 0.0  # padding never activates
    torch.testing.assert_close(mx, ref.mx)
    torch.testing.assert_close(mean, ref.mean)
    assert torch.equal(nact, ref.nact)
    live = mx > 0
    assert live.sum() > 10
    picked = acts.gather(1, arg[:, None, :])[:, 0]  # argmax: the position of the max (ties allowed)
    torch.testing.assert_close(picked[live], mx[live])


# ------------------------------------------------------------------------------------------ token residuals


def test_float16_scaled_keeps_values_beyond_float16s_range_to_its_precision() -> None:
    """Gemma's residual stream has values past float16's 65,504 (70,656 at layer 9 of the 270M model): a row
    that holds one is stored divided by the smallest power of two that fits, every other row unscaled."""
    from dagster_project.lib.extraction import FLOAT16_MAX, float16_scaled

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 32, generator=g) * 20
    x[1, 3] = -70656.0  # Gemma 3 270M's largest at layer 9
    x[2, 0] = 1e9
    x[3, 5] = 65280.0  # within float16's range (and a bfloat16 value): no scale
    x[4] = 0.0
    x[5, :4] = torch.tensor([3e-6, -1e-7, 6.2e-5, 1e-3])  # below and at float16's normal range
    q, scale = float16_scaled(x.to(torch.bfloat16))
    assert q.dtype == torch.float16 and scale.dtype == torch.float32 and torch.isfinite(q).all()
    assert scale.tolist() == [1.0, 2.0, 2.0**14, 1.0, 1.0, 1.0]
    assert (torch.log2(scale) == torch.log2(scale).round()).all()  # powers of two: exact division
    ref = x.to(torch.bfloat16).float()
    back = q.float() * scale[:, None]
    assert (back - ref).abs().le(FP16_RTOL * ref.abs() + 6e-8 * scale[:, None]).all()
    # bfloat16 values within float16's normal range are kept exactly (8 mantissa bits fit in 10)
    normal = (ref.abs() / scale[:, None] >= 2.0**-14) | (ref == 0)
    assert torch.equal(back[normal], ref[normal])
    # float32 input: float16's largest value needs no scale, the next float32 above it does
    _, scale = float16_scaled(torch.tensor([[FLOAT16_MAX], [np.nextafter(FLOAT16_MAX, np.inf, dtype=np.float32)]]))
    assert scale.tolist() == [1.0, 2.0]
    # non-finite values stay what they are, unscaled
    q, scale = float16_scaled(torch.tensor([[float("inf"), 1.0], [float("nan"), 2.0]]))
    assert scale.tolist() == [1.0, 1.0] and q[0, 0] == float("inf") and q[1, 0].isnan()


def _extract_to_tmp_lake(lm: LoadedModel, saes: dict, lake, texts: list[str], dataset: str = "d",  # noqa: ANN001
                         **kw) -> dict:  # noqa: ANN003
    from dagster_project.lib.extraction import extract_to_lake

    items = tokenize(lm.tokenizer, texts, list(range(len(texts))), 64)
    metas = {layer: {"model_id": "tiny", "config_hash": "h", "layer": layer, "dataset": dataset} for layer in saes}
    return extract_to_lake(lm, saes, items, dict(enumerate(texts)), lake, dataset, metas, 80, **kw)


def test_token_residuals_in_the_lake_align_with_tokens_and_token_activations(
    tiny_lm: LoadedModel, tiny_saes: Path, tmp_path: Path
) -> None:
    """One row per real token, keyed exactly as ``tokens`` (BOS dropped), every ``token_activations`` key
    among them; the reader gives float32 vectors whose per-sample mean is the pooled ``resid_mean``; the
    files carry the partition's provenance record and the layer's check covers them."""
    import pandas as pd

    from dagster_project.lib.lake import Lake, LakeError, read_token_residuals
    from dagster_project.provenance import check_layer, partitions

    lake = Lake(str(tmp_path / "lake"), "t")
    saes = {layer: load_gemmascope_dir(tiny_saes / f"layer_{layer}") for layer in (0, 2)}
    m = _extract_to_tmp_lake(tiny_lm, saes, lake, TEXTS, with_token_residuals=True)
    assert m["writer_busy_seconds_token_residuals"] > 0 and m["token_residuals_scaled"] == 0
    tokens = lake.read("tokens", dataset="d").to_pandas()
    for layer in saes:
        tr = read_token_residuals(lake, layer, ["d"])
        assert tr.resid.dtype == np.float32 and tr.resid.shape == (len(tokens), TINY_D)
        keys = list(zip(tr.sample_id.tolist(), tr.token_pos.tolist(), strict=True))
        assert keys == sorted(zip(tokens.sample_id, tokens.token_pos, strict=True))  # same keys, sorted
        assert set(tr.dataset) == {"d"}
        ta = lake.read("token_activations", layer, "d").to_pandas()
        assert set(zip(ta.sample_id, ta.token_pos, strict=True)) <= set(keys) and len(ta) > 0
        res = lake.read("residuals", layer, "d").to_pandas().set_index("sample_id")
        means = pd.DataFrame(tr.resid).groupby(tr.sample_id).mean()
        for sid, row in means.iterrows():
            vec = tr.resid[tr.sample_id == sid]
            tol = FP16_RTOL * np.abs(vec).mean(0) + 1e-3
            assert (np.abs(row.to_numpy() - np.asarray(res.loc[sid].resid_mean)) <= tol).all()
        assert lake.read_meta("token_residuals", layer, "d") == lake.read_meta("activations", layer, "d")
        assert ("token_residuals", "d") in partitions(lake, layer)
        assert check_layer(lake, layer, expected=None)["config_hash"] == "h"
    # a token_residuals file made with another config is caught like any other activation file
    other = lake.read("token_residuals", 0, "d")
    lake.write("token_residuals", other, 0, "d", meta={"model_id": "tiny", "config_hash": "other"})
    with pytest.raises(LakeError, match="different models/SAEs/configs"):
        check_layer(lake, 0, expected=None)
    with pytest.raises(LakeError, match=r"without token residuals.*featurelake backfill --layer 0 --dataset nope"):
        read_token_residuals(lake, 0, ["nope"])


def test_token_residuals_flag_off_writes_none_and_a_rerun_replaces_them(
    tiny_lm: LoadedModel, tiny_saes: Path, tmp_path: Path
) -> None:
    """Off (the library's default): no token_residuals file, the other tables as before, and the layer's
    provenance check passes without them. On twice: one file per partition, rows of the second run only.
    Off after on: the earlier partition goes (it would describe another extraction)."""
    from dagster_project.lib.lake import Lake
    from dagster_project.provenance import check_layer

    lake = Lake(str(tmp_path / "lake"), "t")
    saes = {1: load_gemmascope_dir(tiny_saes / "layer_1")}
    m = _extract_to_tmp_lake(tiny_lm, saes, lake, TEXTS)
    assert "writer_busy_seconds_token_residuals" not in m and "token_residuals_scaled" not in m
    assert not lake.table_dir("token_residuals").exists()
    assert all(lake.exists(t, 1, "d") for t in ("activations", "token_activations", "residuals"))
    assert check_layer(lake, 1, expected=None)["config_hash"] == "h"

    n_tokens = lake.read("tokens", dataset="d").num_rows
    _extract_to_tmp_lake(tiny_lm, saes, lake, TEXTS, with_token_residuals=True)
    _extract_to_tmp_lake(tiny_lm, saes, lake, TEXTS[:2], with_token_residuals=True)  # fewer texts
    part = lake.partition_dir("token_residuals", 1, "d")
    assert sorted(p.name for p in part.iterdir()) == ["part-0.parquet"]
    got = lake.read("token_residuals", 1, "d")
    assert got.num_rows == lake.read("tokens", dataset="d").num_rows < n_tokens
    assert set(got.column("sample_id").to_pylist()) == {0, 1}
    import duckdb

    glob = lake.glob("token_residuals")
    assert duckdb.sql(f"select count(*) from read_parquet('{glob}')").fetchall() == [(got.num_rows,)]

    _extract_to_tmp_lake(tiny_lm, saes, lake, TEXTS)
    assert not lake.exists("token_residuals", 1, "d") and not part.exists()
    assert lake.exists("activations", 1, "d")


def test_token_residuals_setting_follows_the_profile_unless_the_run_sets_it() -> None:
    """The embedded default profile writes them (its demo's token-level probes read them); the 27B profile
    (d_model 5,376: ~10 KB a token and layer) does not; a run's write_token_residuals overrides either."""
    from dagster_project.config import PROFILES, ExtractionConfig
    from dagster_project.lib.extraction import LAYER_TABLES

    assert ExtractionConfig().write_token_residuals is None
    assert ExtractionConfig().token_residuals(PROFILES["default"]) is True
    assert ExtractionConfig().token_residuals(PROFILES["gemma-3-27b"]) is False
    assert ExtractionConfig(write_token_residuals=False).token_residuals(PROFILES["default"]) is False
    assert ExtractionConfig(write_token_residuals=True).token_residuals(PROFILES["gemma-3-27b"]) is True
    # the activations asset cleans and writes every one of these per partition
    assert "token_residuals" in LAYER_TABLES
    # a speed-and-storage setting: it does not enter the partitions' config hash
    flipped = PROFILES["default"].model_copy(update={"token_residuals": False})
    assert flipped.config_hash() == PROFILES["default"].config_hash()

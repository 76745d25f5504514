"""GPU extraction benchmark at the user's real scale, with random weights (speed does not depend on values).

Builds a ``Gemma3ForCausalLM`` from the Gemma 3 27B (or 270M) text configuration with random bf16 weights
and random GemmaScope-shaped JumpReLU SAEs, then runs on the same synthetic token sequences:

- the seed's method: batch size 1, the whole model (``output_hidden_states``, LM head included), the SAEs
  encoded at the hooked layers, dense per-sample max / mean / argmax arrays copied to the host;
- the project's extraction code path itself (``dagster_project.lib.extraction.extract_to_lake``): length
  batches, forward stopped after the deepest hooked layer, one pass for all layers, SAE encode and pooling
  on the GPU, sparse rows streamed to a Parquet lake;
- the FLOP floor: 2 x (parameters of the decoder layers through the deepest hooked layer) x tokens / the
  bf16 matmul rate measured on this card (attention's own FLOPs are left out, so the floor is optimistic).

Prints one markdown table. Run on the lent GPU machine: ``python benchmarks/extract_gpu.py --config 27b``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

CONFIGS = {
    "27b": {
        "text": dict(vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                     num_attention_heads=32, num_key_value_heads=16, head_dim=128, sliding_window=1024,
                     query_pre_attn_scalar=168, max_position_embeddings=131072),
        "layers": [16, 31, 40, 53],
        "width": 16384,
    },
    "270m": {
        "text": dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                     num_attention_heads=4, num_key_value_heads=1, head_dim=256, sliding_window=512,
                     query_pre_attn_scalar=256, max_position_embeddings=32768),
        "layers": [6, 9, 12],
        "width": 16384,
    },
}


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def gemm_shapes(cfg, m: int, peak: float, reps: int = 20) -> dict:  # noqa: ANN001
    """One decoder layer's projections at ``m`` tokens: as transformers runs them (q, k, v, o, gate, up,
    down apart) and with q/k/v and gate/up fused into one GEMM each; the rate of each against ``peak``."""
    d, inter = cfg.hidden_size, cfg.intermediate_size
    hq, hkv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    x = torch.randn(m, d, device="cuda", dtype=torch.bfloat16)
    xa = torch.randn(m, hq, device="cuda", dtype=torch.bfloat16)
    xi = torch.randn(m, inter, device="cuda", dtype=torch.bfloat16)
    shapes = {"q": (x, hq), "k": (x, hkv), "v": (x, hkv), "o": (xa, d), "gate": (x, inter), "up": (x, inter),
              "down": (xi, d), "qkv fused": (x, hq + 2 * hkv), "gate+up fused": (x, 2 * inter)}
    out = {}
    for name, (a, n) in shapes.items():
        w = torch.randn(n, a.shape[1], device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            torch.nn.functional.linear(a, w)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            torch.nn.functional.linear(a, w)
        torch.cuda.synchronize()
        secs = (time.perf_counter() - t) / reps
        out[name] = {"ms": secs * 1e3, "tflops": 2 * m * n * a.shape[1] / secs / 1e12}
    apart = sum(out[k]["ms"] for k in ("q", "k", "v", "o", "gate", "up", "down"))
    fused = sum(out[k]["ms"] for k in ("qkv fused", "o", "gate+up fused", "down"))
    flops = 2 * m * (d * (hq + 2 * hkv) + hq * d + 3 * d * inter)
    print(f"\nGEMMs of one layer at {m} tokens: apart {apart:.3f} ms ({flops / apart / 1e9 / peak:.0%} of peak), "
          f"fused {fused:.3f} ms ({flops / fused / 1e9 / peak:.0%} of peak)")
    for k, v in out.items():
        print(f"  {k}: {v['ms']:.3f} ms, {v['tflops']:.0f} TFLOP/s ({v['tflops'] / peak:.0%})")
    return {"m": m, "apart_ms": apart, "fused_ms": fused, "shapes": out}


def build_model(name: str):  # noqa: ANN201
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(**CONFIGS[name]["text"], bos_token_id=2, eos_token_id=1, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Gemma3ForCausalLM(cfg)  # transformers' own init, on the GPU, in bf16
    finally:
        torch.set_default_dtype(old)
    model.eval()
    return model, cfg


def build_saes(d_in: int, width: int, layers: list[int]):  # noqa: ANN201
    from dagster_project.lib.sae import LoadedSAE, NativeEncoder

    saes = {}
    for layer in layers:
        g = torch.Generator(device="cuda").manual_seed(layer)
        w = torch.randn(d_in, width, device="cuda", generator=g) / d_in**0.5
        enc = NativeEncoder(w, torch.zeros(width, device="cuda"), threshold=torch.zeros(width, device="cuda"))
        saes[layer] = LoadedSAE(enc, f"random-jumprelu-{d_in}x{width}-L{layer}", d_in, width)
    return saes


def saes_in(saes: dict, dtype: torch.dtype) -> dict:  # noqa: ANN001
    """The same SAEs with their encoders in ``dtype`` (the project encodes in the profile's ``sae_dtype``)."""
    import copy

    out = {}
    for layer, sae in saes.items():
        twin = copy.copy(sae)
        twin.encoder = copy.deepcopy(sae.encoder).to(dtype=dtype)
        out[layer] = twin
    return out


def calibrate_thresholds(lm, saes, items, target_l0: int = 64) -> dict[int, float]:  # noqa: ANN001
    """Set JumpReLU thresholds so about ``target_l0`` features fire per token (GemmaScope 2's medium L0 is
    53-129): per feature, the quantile of its pre-activation over tokens of 8 texts spread over the set."""
    from dagster_project.lib.extraction import forward_layers, pad_batch

    picks = [items[i] for i in range(0, len(items), max(1, len(items) // 8))][:8]
    ids, att = pad_batch(picks, 0, lm.device)
    hidden = forward_layers(lm, ids, att, sorted(saes))
    mask = att[:, 1:].bool()
    l0 = {}
    for layer, sae in saes.items():
        h = hidden[layer][:, 1:][mask].float()
        pre = h @ sae.encoder.W_enc.float()
        q = 1 - target_l0 / sae.d_sae
        sub = pre[torch.randperm(pre.shape[0], device=pre.device)[:8192]]
        thr = torch.quantile(sub, q, dim=0).clamp_min(1e-3)
        sae.encoder.threshold.data.copy_(thr)
        l0[layer] = float((pre > thr).sum(-1).float().mean())
    return l0


def synthetic_items(n: int, vocab: int, seed: int = 0, lo: int = 150, hi: int = 2048, mean: int = 650):  # noqa: ANN201
    from dagster_project.lib.extraction import Tokenized

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(mean) - 0.18, 0.6, n).astype(int), lo, hi)
    items = []
    for i, n_tok in enumerate(lengths):
        ids = [2, *rng.integers(10, vocab, int(n_tok)).tolist()]
        # each token covers 4 characters of its text (``synthetic_texts``), as real offsets do
        items.append(Tokenized(i, ids, [(0, 0)] + [(4 * p, 4 * p + 4) for p in range(int(n_tok))], False))
    return items


def synthetic_texts(items) -> dict[int, str]:  # noqa: ANN001
    return {it.sample_id: "tok " * it.n_real for it in items}


class StubTokenizer(SimpleNamespace):
    pad_token_id = 0
    bos_token_id = 2

    def convert_ids_to_tokens(self, i: int) -> str:
        return f"<{i}>"


def run_seed(lm, saes, items) -> dict:  # noqa: ANN001
    layers = sorted(saes)
    n, w = len(items), next(iter(saes.values())).d_sae
    out = {L: {k: np.zeros((n, w), np.float32 if k != "argmax" else np.int32) for k in ("max", "mean", "argmax")}
           for L in layers}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    tokens = 0
    for i, it in enumerate(items):
        ids = torch.tensor([it.ids], device="cuda")
        with torch.inference_mode():
            hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
            for L in layers:
                acts = saes[L].encode(hs[L + 1][0, 1:])
                out[L]["max"][i] = acts.max(0).values.float().cpu().numpy()
                out[L]["mean"][i] = acts.float().mean(0).cpu().numpy()
                out[L]["argmax"][i] = acts.argmax(0).cpu().numpy()
        tokens += it.n_real
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    return {"tokens": tokens, "seconds": secs, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def check_lake(lake, lm, saes, items, n: int = 6) -> dict:  # noqa: ANN001
    """The pipelined, batched path's pooled rows against the same computation done plainly: one text at a
    time, no side stream, no pipelining (``encode_pool_device`` then ``to_arrow``). Races or stream mix-ups
    would show as missing rows or wrong values; bf16 sums differ a little with the batch shape, so
    compare the feature sets (Jaccard) and the max activations (relative error)."""
    from dagster_project.lib.extraction import encode_pool_device, forward_layers, pad_batch

    picks = items[:: max(1, len(items) // n)][:n]
    worst_jac, worst_err = 1.0, 0.0
    for layer, sae in saes.items():
        got = lake.read("activations", layer=layer, dataset="bench").to_pandas()
        for it in picks:
            ids, _ = pad_batch([it], 0, lm.device)
            h = forward_layers(lm, ids, None, [layer])[layer][:, 1:]
            ref = encode_pool_device(h, [it.n_real], [it.sample_id], sae, False, False).to_arrow().pooled.to_pandas()
            g = got[got.sample_id == it.sample_id].set_index("feature_id").max_act
            r = ref.set_index("feature_id").max_act
            both = g.index.intersection(r.index)
            worst_jac = min(worst_jac, len(both) / max(len(g.index.union(r.index)), 1))
            err = float(((g[both] - r[both]).abs() / r[both].abs().clip(lower=1e-3)).quantile(0.99))
            worst_err = max(worst_err, err)
    return {"feature_jaccard_min": round(worst_jac, 4), "max_act_rel_err_p99_max": round(worst_err, 4)}


def run_project(lm, saes, items, batch_tokens: int, with_tokens: bool = True, impl=None,  # noqa: ANN001
                check: bool = False, pack: bool | None = None, lake_dir: str | None = None) -> dict:
    """Time ``extract_to_lake`` (``impl``: another module with the same function, e.g. an older copy;
    ``pack``: this path's packed batches, ``None`` = its default)."""
    from dagster_project.lib import extraction
    from dagster_project.lib.lake import Lake

    kw = {} if impl is not None else {"pack": pack}
    impl = impl or extraction
    with tempfile.TemporaryDirectory(dir=lake_dir) as tmp:
        lake = Lake(tmp, "bench")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        m = impl.extract_to_lake(lm, saes, items, synthetic_texts(items), lake, "bench",
                                 {L: {} for L in saes}, batch_tokens, with_tokens=with_tokens, with_residuals=True,
                                 **kw)
        torch.cuda.synchronize()
        secs = time.perf_counter() - t
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*.parquet"))
        checked = check_lake(lake, lm, saes, items) if check else None
    return {"check": checked, "tokens": m["tokens"], "seconds": secs, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "padding": m["padding_fraction"], "packed": m.get("packed", False), "bytes": size, "batch_tokens": m.get("batch_tokens", batch_tokens),
            "active_per_sample": {k: v for k, v in m.items() if k.startswith("active_features")},
            "writer": {k: round(v, 3) for k, v in m.items() if k.startswith("writer_")}}


def run_forward_only(lm, items, layers, batch_tokens: int, pack: bool = False) -> dict:  # noqa: ANN001
    """The forward pass alone (project batching, stopped after the deepest layer): the GPU-bound ceiling."""
    from dagster_project.lib.extraction import batch_hidden, plan_batches

    batches = [[items[i] for i in b] for b in plan_batches([len(t.ids) for t in items], batch_tokens, True)]

    def once() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        for rows in batches:
            batch_hidden(lm, rows, layers, pack)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    once()
    secs = once()
    return {"tokens": sum(it.n_real for it in items), "seconds": secs, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


class Compiled:
    """Switch between compile modes in one process: patches undone and dynamo's caches reset in between."""

    def __init__(self, model) -> None:  # noqa: ANN001
        self.model = model
        self.saved = {cls: cls.forward for cls in {type(m) for m in model.modules()}}

    def set(self, mode: str) -> None:
        from dagster_project.lib.model import compile_decoder, compile_elementwise

        for cls, fwd in self.saved.items():
            cls.forward = fwd
        torch._dynamo.reset()
        if mode == "elementwise":
            compile_elementwise(self.model)
        elif mode == "decoder":
            compile_decoder(self.model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", choices=sorted(CONFIGS), default="270m")
    p.add_argument("--texts", type=int, default=48)
    p.add_argument("--seed-texts", type=int, default=None, help="texts for the seed's method (default: all)")
    p.add_argument("--batch-tokens", type=int, nargs="+", default=[4096, 8192, 0],
                   help="project runs with compiled decoder layers; 0 = 'auto' (sized by free GPU memory)")
    p.add_argument("--prev", type=str, default=None,
                   help="a module with an older extract_to_lake (e.g. benchmarks/prev_extraction.py from an "
                        "earlier commit) timed first, with that commit's settings, as the baseline of this run")
    p.add_argument("--prev-batch-tokens", type=int, default=8192)
    p.add_argument("--prev-compile", choices=["decoder", "elementwise"], default="decoder",
                   help="how the previous commit compiled the model (elementwise before commit 1ac2721)")
    p.add_argument("--elementwise", action="store_true", help="also time the current path with compile_elementwise")
    p.add_argument("--no-extras", action="store_true", help="only the seed, previous and budget rows")
    p.add_argument("--gemms", action="store_true", help="also time the layer's GEMM shapes, separate vs fused")
    p.add_argument("--json", type=str, default=None)
    args = p.parse_args()
    from dagster_project.lib.model import LoadedModel

    spec = CONFIGS[args.config]
    tflops = matmul_tflops()
    t0 = time.perf_counter()
    model, cfg = build_model(args.config)
    layers = spec["layers"]
    lm = LoadedModel(model, StubTokenizer(), f"random-gemma3-{args.config}", cfg.num_hidden_layers,
                     cfg.hidden_size, torch.device("cuda"), torch.bfloat16)
    saes = build_saes(cfg.hidden_size, spec["width"], layers)
    items = synthetic_items(args.texts, cfg.vocab_size)
    l0 = calibrate_thresholds(lm, saes, items)
    build_s = time.perf_counter() - t0
    deepest = max(layers)
    params = sum(p.numel() for i in range(deepest + 1) for p in model.model.layers[i].parameters())
    tokens = sum(it.n_real for it in items)
    floor_tps = tflops * 1e12 / (2 * params)
    saes_bf16 = saes_in(saes, torch.bfloat16)
    seed_items = items[: args.seed_texts] if args.seed_texts else items
    seed = run_seed(lm, saes, seed_items)  # eager, before any compile
    seed_tps = seed["tokens"] / seed["seconds"]
    results = {"config": args.config, "tflops": tflops, "params_through_deepest": params, "tokens": tokens,
               "floor_tps": floor_tps, "seed": seed, "runs": [], "build_s": build_s,
               "gpu": torch.cuda.get_device_name(), "l0": l0, "torch": torch.__version__}
    rows = [("seed's method (batch 1, whole model, dense, fp32 SAE)", seed_tps, seed["peak_gib"], "")]

    def record(name: str, pr: dict, warm_s: float) -> None:
        tps = pr["tokens"] / pr["seconds"]
        results["runs"].append({"name": name, "warmup_s": warm_s, **pr})
        note = f"warm-up pass {warm_s:.1f} s"
        if "padding" in pr:
            note = (f"batch_tokens {pr['batch_tokens']}, padding {pr['padding']:.1%}, "
                    f"{pr['bytes'] / 2**20:.0f} MiB Parquet; {note}")
            w = pr.get("writer", {})
            if w:
                busy = ", ".join(f"{k.removeprefix('writer_busy_seconds_')} {v:.2f}" for k, v in w.items() if "busy" in k)
                note += f"; waited for writers {w.get('writer_wait_seconds', 0):.2f} s (thread-seconds: {busy})"
                if "writer_close_seconds" in w:
                    note += f", closing the files {w['writer_close_seconds']:.2f} s"
        if pr.get("check"):
            note += f"; vs one text at a time: {pr['check']}"
        rows.append((name, tps, pr["peak_gib"], note))
        print(f"{name}: {tps:,.0f} tok/s ({tps / floor_tps:.0%} of floor) {note}", flush=True)

    def project(name: str, bt: int, **kw) -> None:  # noqa: ANN003
        # warm-up over the whole set once: cuBLAS autotuning and torch.compile's graphs for every shape
        # class are paid once per process, not per batch; timed apart
        t_w = time.perf_counter()
        warm = run_project(lm, saes_bf16, items, bt, check=kw.get("impl") is None, **kw)  # check untimed
        warm_s = time.perf_counter() - t_w
        pr = run_project(lm, saes_bf16, items, bt, **kw)
        pr["check"] = warm["check"]
        record(name, pr, warm_s)

    def extras(bt_best: int, packed: bool) -> None:
        """The shares of the pieces at the best budget: padding, the compiled pool, per-token rows, the
        forward pass alone (padded and packed), and the GEMM shapes."""
        from dagster_project.lib.extraction import pooling

        if packed:  # the same path with padded batches, for the packing's share
            project(f"this path, batch_tokens {bt_best}, padded batches (pack=False)", bt_best, pack=False)
        pooling.COMPILE_POOL = False  # the SAE encode and pooling as separate eager kernels
        project(f"this path, batch_tokens {bt_best}, encode+pool not compiled (COMPILE_POOL=False)", bt_best)
        pooling.COMPILE_POOL = True
        project(f"this path, batch_tokens {bt_best}, without per-token rows", bt_best, with_tokens=False)
        if Path("/dev/shm").is_dir():  # the disk's share
            project(f"this path, batch_tokens {bt_best}, lake in /dev/shm (memory, no disk)", bt_best,
                    lake_dir="/dev/shm")
        for pk in ([False, True] if packed else [False]):
            fo = run_forward_only(lm, items, layers, bt_best, pack=pk)
            record(f"forward alone (no SAE, no host), batch_tokens {bt_best}, {'packed' if pk else 'padded'}",
                   fo, 0.0)
        if args.gemms:
            results["gemms"] = gemm_shapes(cfg, bt_best, tflops)

    modes = Compiled(model)
    if args.prev:
        import importlib.util

        spec_ = importlib.util.spec_from_file_location("prev_extraction", args.prev)
        prev = importlib.util.module_from_spec(spec_)
        sys.modules["prev_extraction"] = prev
        spec_.loader.exec_module(prev)
        modes.set(args.prev_compile)
        project(f"previous commit's path, batch_tokens {args.prev_batch_tokens}, compile_{args.prev_compile}",
                args.prev_batch_tokens, impl=prev)
    if args.elementwise:
        modes.set("elementwise")
        project(f"this path, batch_tokens {args.prev_batch_tokens}, compile_elementwise", args.prev_batch_tokens)
    modes.set("decoder")
    for bt in args.batch_tokens:
        project(f"this path, batch_tokens {bt or 'auto'}, compile_decoder", bt)
    best = max((r for r in results["runs"] if "compile_decoder" in r["name"]), key=lambda r: r["tokens"] / r["seconds"])
    bt_best = best["batch_tokens"]
    packed = bool(best.get("packed"))
    if not args.no_extras:
        extras(bt_best, packed)
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 matmul {tflops:.0f} TFLOP/s; "
          f"Gemma 3 {args.config} config (random bf16), layers {layers}, SAEs {cfg.hidden_size}x{spec['width']} "
          f"JumpReLU; {len(items)} texts, {tokens} tokens (seed's method on {len(seed_items)}); params through "
          f"layer {deepest}: {params / 1e9:.2f} B; FLOP floor {floor_tps:,.0f} tok/s; SAE L0 per token {l0}; "
          f"build {build_s:.0f} s\n")
    print("| method | tokens/s | vs seed | of FLOP floor | peak GPU GiB | notes |")
    print("|---|---:|---:|---:|---:|---|")
    for name, tps, peak, note in rows:
        print(f"| {name} | {tps:,.0f} | {tps / seed_tps:.2f}x | {tps / floor_tps:.0%} | {peak:.1f} | {note} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()

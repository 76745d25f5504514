"""Extraction benchmark: the project's extraction path against the seed's method, same texts, same machine.

Seed's method: batch size 1, the whole model run (``output_hidden_states``, LM head included), dense
per-sample max / mean / argmax arrays over the full SAE width, saved as ``.npy``.
Project: ``dagster_project.lib.extraction.extract_to_lake`` (the code the ``activations`` asset runs):
length-bucketed batches, forward stopped after the hooked layer, sparse rows streamed to Parquet.

Each method runs in its own process so peak RSS is its own. Model load time is reported apart from
throughput. Run: ``python benchmarks/extract.py [--layer 9] [--sizes 110 440]``; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def corpus_texts(n: int) -> list[str]:
    from dagster_project.lib import demo_corpus

    texts: list[str] = []
    for name in ("demo_train", "demo_test", "demo_ood_prose", "demo_ood_af_only"):
        texts += [r["text"] for r in demo_corpus.generate(name)]
    if n > len(texts):
        raise SystemExit(f"the demo corpus has {len(texts)} texts; asked for {n}")
    return texts[:n]


def make_sae(folder: Path, d_in: int, width: int, k: int) -> None:
    """A random TopK SAE in sae-lens's format: it costs what a trained one costs."""
    import torch
    from sae_lens import TopKSAE, TopKSAEConfig

    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=width, k=k, dtype="float32", device="cpu"))
    sae.save_model(str(folder))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_seed(texts: list[str], layer: int, sae_dir: str, out: Path, max_tokens: int) -> dict:
    import numpy as np
    import torch

    from dagster_project.lib.model import load_model
    from dagster_project.lib.sae import load_saelens_dir

    t0 = time.time()
    lm = load_model("gguf:gemma3-270m", dtype="bfloat16", device="cpu")
    sae = load_saelens_dir(sae_dir)
    load_s = time.time() - t0
    n, w = len(texts), sae.d_sae
    mx = np.zeros((n, w), np.float32)
    mean = np.zeros((n, w), np.float32)
    arg = np.zeros((n, w), np.int32)
    tokens = 0
    t0 = time.time()
    for i, text in enumerate(texts):
        ids = lm.tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens + 1)["input_ids"]
        with torch.inference_mode():
            hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
            acts = sae.encode(hs[layer + 1][0, 1:].float())
        mx[i] = acts.max(0).values.numpy()
        mean[i] = acts.mean(0).numpy()
        arg[i] = acts.argmax(0).numpy()
        tokens += acts.shape[0]
    for name, arr in (("max", mx), ("mean", mean), ("argmax", arg)):
        np.save(out / f"{name}.npy", arr)
    secs = time.time() - t0
    size = sum(f.stat().st_size for f in out.glob("*.npy"))
    return {"tokens": tokens, "seconds": secs, "load_s": load_s, "bytes": size, "peak_rss_mib": peak_rss_mib()}


def run_project(texts: list[str], layer: int, sae_dir: str, out: Path, max_tokens: int, batch_tokens: int) -> dict:
    from dagster_project.lib.extraction import extract_to_lake, tokenize
    from dagster_project.lib.lake import Lake
    from dagster_project.lib.model import load_model
    from dagster_project.lib.sae import load_saelens_dir

    t0 = time.time()
    lm = load_model("gguf:gemma3-270m", dtype="bfloat16", device="cpu")
    sae = load_saelens_dir(sae_dir)
    load_s = time.time() - t0
    lake = Lake(str(out), "bench")
    t0 = time.time()
    items = tokenize(lm.tokenizer, texts, list(range(len(texts))), max_tokens)
    m = extract_to_lake(lm, {layer: sae}, items, dict(enumerate(texts)), lake, "bench", {layer: {}}, batch_tokens)
    secs = time.time() - t0
    pooled = lake.file("activations", layer, "bench").stat().st_size
    every = sum(f.stat().st_size for f in lake.base.rglob("*.parquet"))
    return {"tokens": m["tokens"], "seconds": secs, "load_s": load_s, "bytes": pooled, "bytes_all": every,
            "peak_rss_mib": peak_rss_mib(), "padding_fraction": m["padding_fraction"]}


def child(args: argparse.Namespace) -> None:
    texts = corpus_texts(args.n)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.method == "seed":
        res = run_seed(texts, args.layer, args.sae, out, args.max_tokens)
    else:
        res = run_project(texts, args.layer, args.sae, out, args.max_tokens, args.batch_tokens)
    sys.stdout.write("RESULT " + json.dumps(res) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--layer", type=int, default=9)
    p.add_argument("--sizes", type=int, nargs="+", default=[110, 440])
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--child", choices=["seed", "project"])
    p.add_argument("--n", type=int)
    p.add_argument("--sae")
    p.add_argument("--out")
    args = p.parse_args()
    if args.child:
        args.method = args.child
        return child(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        sae_dir = Path(tmp) / "sae"
        make_sae(sae_dir, 640, args.width, args.k)
        for n in args.sizes:
            for method in ("seed", "project"):
                cmd = [sys.executable, __file__, "--child", method, "--n", str(n), "--sae", str(sae_dir),
                       "--out", str(Path(tmp) / f"{method}{n}"), "--layer", str(args.layer),
                       "--max-tokens", str(args.max_tokens), "--batch-tokens", str(args.batch_tokens)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not line:
                    raise SystemExit(f"{method} n={n} failed:\n{proc.stderr[-3000:]}")
                res = json.loads(line[0][7:])
                res.update(method=method, n=n)
                rows.append(res)
                sys.stderr.write(f"{method} n={n}: {res}\n")
    seed = {r["n"]: r for r in rows if r["method"] == "seed"}
    print(f"\nExtraction, Gemma 3 270M (GGUF, bf16, CPU), layer {args.layer}, SAE TopK {args.width} k={args.k}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}\n")
    print("| method | texts | tokens | tokens/s | vs seed | peak RSS MiB | pooled bytes on disk | vs seed | load s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        s = seed[r["n"]]
        tps = r["tokens"] / r["seconds"]
        print(f"| {r['method']} | {r['n']} | {r['tokens']} | {tps:,.0f} | {tps / (s['tokens'] / s['seconds']):.2f}x "
              f"| {r['peak_rss_mib']:,.0f} | {r['bytes']:,} | {s['bytes'] / r['bytes']:.1f}x smaller "
              f"| {r['load_s']:.1f} |")
    proj = [r for r in rows if r["method"] == "project"]
    if proj:
        sizes = ", ".join(f"n={r['n']}: {r['bytes_all']:,} B" for r in proj)
        padding = ", ".join(f"{r['padding_fraction']:.1%}" for r in proj)
        print(f"\nProject, every table (pooled + per-token + tokens + residuals): {sizes}; padding {padding}")


if __name__ == "__main__":
    main()

"""What ``token_residuals`` costs: bytes per token on disk and extra extraction time, on the embedded model.

The project's extraction (``extract_to_lake``, what the ``activations`` asset runs) over the same demo texts,
alternately without and with ``with_token_residuals``, each into a fresh lake, in one process (the model
loaded once). Reports the median seconds of each setting, the difference, and each table's bytes per token.
Run from the repository root: ``python -m benchmarks.token_residuals [--n 120] [--repeats 3] [--dtype auto]``;
prints markdown.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.extract import corpus_texts, make_sae


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=120, help="demo texts")
    p.add_argument("--layer", type=int, default=9)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="auto", help="auto (the default profile's), bfloat16 or float32")
    p.add_argument("--batch-tokens", type=int, default=4096)
    args = p.parse_args()

    from dagster_project.lib.extraction import LAYER_TABLES, extract_to_lake, tokenize
    from dagster_project.lib.lake import Lake
    from dagster_project.lib.model import load_model, resolve_dtype
    from dagster_project.lib.sae import load_saelens_dir

    dtype = resolve_dtype(args.dtype, "cpu")
    texts = corpus_texts(args.n)
    lm = load_model("gguf:gemma3-270m", dtype=dtype, device="cpu")
    with tempfile.TemporaryDirectory(prefix="bench-token-resid-") as tmp:
        make_sae(Path(tmp) / "sae", lm.d_model, 4096, 32)
        sae = load_saelens_dir(str(Path(tmp) / "sae"))
        items = tokenize(lm.tokenizer, texts, list(range(len(texts))), 1024)
        n_tokens = sum(t.n_real for t in items)
        seconds: dict[bool, list[float]] = {False: [], True: []}
        sizes: dict[str, int] = {}
        busy: list[float] = []
        for r in range(args.repeats * 2 + 1):
            on = r % 2 == 1  # off, on, off, on, ..., off: the first run warms up and is not counted
            lake = Lake(str(Path(tmp) / f"lake{r}"), "bench")
            t0 = time.perf_counter()
            m = extract_to_lake(lm, {args.layer: sae}, items, dict(enumerate(texts)), lake, "bench",
                                {args.layer: {}}, args.batch_tokens, with_token_residuals=on)
            if r:
                seconds[on].append(time.perf_counter() - t0)
            if on:
                busy.append(m["writer_busy_seconds_token_residuals"])
                for t in (*LAYER_TABLES, "tokens"):
                    f = lake.file(t, None if t == "tokens" else args.layer, "bench")
                    sizes[t] = f.stat().st_size
        off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
        out = sys.stdout
        out.write(f"{len(texts)} demo texts, {n_tokens} tokens, layer {args.layer}, {dtype}, "
                  f"batch_tokens {args.batch_tokens}, {args.repeats} runs each (medians)\n\n")
        out.write("| | seconds | tok/s |\n|---|---|---|\n")
        out.write(f"| without token_residuals | {off:.1f} | {n_tokens / off:.0f} |\n")
        out.write(f"| with token_residuals | {on:.1f} | {n_tokens / on:.0f} |\n")
        out.write(f"| difference | {on - off:+.1f} ({(on - off) / off:+.1%}) | |\n\n")
        out.write(f"token_residuals writer thread busy: {statistics.median(busy):.2f} s (overlaps the forward)\n\n")
        out.write("| table | bytes | bytes per token |\n|---|---|---|\n")
        for t, b in sizes.items():
            out.write(f"| {t} | {b:,} | {b / n_tokens:.1f} |\n")


if __name__ == "__main__":
    main()

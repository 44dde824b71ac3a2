"""Reference model speed on one CPU core: prefill and decode, float32 against float16.

Run: python bench/reference_speed.py [--decode-tokens N]

BLAS is pinned to one thread (before numpy loads) because a host serves many
sessions at once and the target is per core. Every figure is the best of a
few repeats, measured side by side in this one run; "vs fp32" is the ratio
to the float32 figure of the same measure.
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402

from gpunexus.verify.generate import generate  # noqa: E402
from gpunexus.verify.model import ReferenceModel  # noqa: E402
from gpunexus.verify.registry import load_reference  # noqa: E402
from gpunexus.verify.sampler import SamplingParams  # noqa: E402

PROMPT_TOKENS = 100
REPEATS = 3


def best_seconds(run: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def decode_seconds(model: ReferenceModel, prompt: list[int], n: int) -> float:
    """Best time for n cached single-token steps after the prompt, prefill excluded."""
    best = float("inf")
    for _ in range(REPEATS):
        session = model.new_session()
        out = session.prefill(prompt)
        start = time.perf_counter()
        for _ in range(n):
            out = session.step(int(out.logits.argmax()))
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-tokens", type=int, default=256)
    n = parser.parse_args().decode_tokens

    _, tokenizer = load_reference()
    prompt = tokenizer.completion_prompt("The quick brown fox jumps over the lazy dog. " * 3)[:PROMPT_TOKENS]
    runs = {
        "generate greedy (incl. prefill)": SamplingParams(temperature=0, max_tokens=n),
        "generate top_p 0.95 (incl. prefill)": SamplingParams(top_p=0.95, max_tokens=n, seed=1),
    }

    rows = []  # (measure, dtype, tokens, tokens/s)
    for dtype in (np.float32, np.float16):
        model, _ = load_reference(dtype=dtype)
        seconds = best_seconds(lambda: model.new_session().prefill(prompt))
        rows.append(("prefill", dtype, PROMPT_TOKENS, PROMPT_TOKENS / seconds))
        rows.append(("decode (model step only)", dtype, n, n / decode_seconds(model, prompt, n)))
        for label, params in runs.items():
            # It may end early on a stop token: count what it made.
            made = len(list(generate(model, tokenizer, prompt, params)))
            seconds = best_seconds(lambda: list(generate(model, tokenizer, prompt, params)))
            rows.append((label, dtype, made, made / seconds))

    float32 = {measure: rate for measure, dtype, _, rate in rows if dtype is np.float32}
    threads = os.environ["OPENBLAS_NUM_THREADS"]
    print(f"reference model {load_reference()[0].model_id}, BLAS threads {threads}, best of {REPEATS}")
    print(f"{'measure':<38} {'dtype':<8} {'tokens':>6} {'tokens/s':>9} {'vs fp32':>8}")
    for measure, dtype, tokens, rate in rows:
        print(f"{measure:<38} {np.dtype(dtype).name:<8} {tokens:>6} {rate:>9.0f} {rate / float32[measure]:>8.2f}")


if __name__ == "__main__":
    main()

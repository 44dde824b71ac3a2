"""JSON mode on the reference model: decode tokens/s against unconstrained decoding.

Run: python bench/json_mode.py [--seeds N] [--max-tokens N]

Both modes decode the same prompts with the same seeds, interleaved seed by
seed in this one run (this machine is noisy: the ratio is the figure). Left
to itself from ``{`` the tiny model closes the object at once (``{}``), which
measures nothing, so every generation continues an answer already begun,
``{"fox": "`` (as a failover continuation does: delivered tokens, then
decoding), in every mode alike; the constrained decoder then spends its time
in strings, keys and values, the bulk of real JSON. The
rate is decode only, from the first token to the last of each generation
(prefill excluded: JSON outputs end early at their stop token, and a short
output would otherwise carry more prefill per token). Rows with penalties
and logit bias show what the other logit shaping costs. BLAS is pinned to
one thread, as for a host serving many sessions (bench/reference_speed.py).
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

from gpunexus.verify.generate import generate  # noqa: E402
from gpunexus.verify.registry import load_reference  # noqa: E402
from gpunexus.verify.sampler import SamplingParams  # noqa: E402

MODES = {
    "unconstrained": {},
    "json_object": {"json_mode": True},
    "penalties + logit_bias": {"presence_penalty": 0.5, "frequency_penalty": 0.5, "logit_bias": ((ord("e"), 2.0),)},
}


BEGUN = '{"fox": "'


def decode(model, tokenizer, prompt: list[int], params: SamplingParams) -> tuple[int, float, str]:
    """(tokens after the first, seconds from first to last token, text including the begun answer)."""
    first = last = None
    count, text = 0, [BEGUN]
    begun = tokenizer.encode(BEGUN)
    for tok in generate(model, tokenizer, prompt + begun, params, first_draw=len(begun)):
        now = time.perf_counter()
        first = now if first is None else first
        last, count = now, count + 1
        text.append(tok.text)
    return count - 1, (last - first) if count > 1 else 0.0, "".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    model, tokenizer = load_reference()
    prompts = [tokenizer.chat_prompt([{"role": "user", "content": f"describe fox number {i} as json"}]) for i in range(args.seeds)]
    totals = {mode: [0, 0.0] for mode in MODES}
    parsed = 0
    for temperature in (1.0, 0.0):
        for seed, prompt in enumerate(prompts):
            for mode, extra in MODES.items():
                params = SamplingParams(temperature=temperature, max_tokens=args.max_tokens, seed=seed, **extra)
                tokens, seconds, text = decode(model, tokenizer, prompt, params)
                totals[mode][0] += tokens
                totals[mode][1] += seconds
                if mode == "json_object":
                    parsed += isinstance(json.loads(text), dict)
    base = totals["unconstrained"][0] / totals["unconstrained"][1]
    print(f"reference model 'tiny', {args.seeds} seeds x temperature 1.0 and 0.0, max_tokens {args.max_tokens}, "
          f"BLAS threads {os.environ['OPENBLAS_NUM_THREADS']}")
    print(f"JSON outputs that parse as an object: {parsed} of {2 * args.seeds}\n")
    print(f"{'mode':<24} {'tokens':>8} {'tokens/s':>10} {'vs unconstrained':>17}")
    for mode, (tokens, seconds) in totals.items():
        rate = tokens / seconds
        print(f"{mode:<24} {tokens:>8} {rate:>10.0f} {rate / base:>17.2f}")


if __name__ == "__main__":
    main()

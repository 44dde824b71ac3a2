"""Honesty bench: detection and false-positive rates per attack and per audit path, and what audits cost.

For each of --requests requests (chat prompts of 5 random words, ~33 tokens
with the chat template; temperatures 0.7 / 1.0 / 1.3, top_p 1 / 0.95, top_k
0 / 50; outputs of up to --max-tokens tokens, 32 by default: short, so that
1,000 requests per row fit in minutes on one core) it builds what an honest
host and seven cheating hosts hand over:

  honest        float16 host, token-by-token decode, own commitment
  other-model   same architecture, other weight seed, claims the right hash
  int4          the right weights rounded to 4 bits per output channel
  random+proof  random printable tokens with the commitment an honest prefill
                over them gives
  wrong-seed    an honest output drawn with another seed (same prompt)
  replay        an honest answer (and its commitment) to an earlier, different prompt
  inflated      honest output, tokens_out raised by 1-5
  early-stop    honest output cut short, finish_reason "stop", honest
                commitment over the cut

and judges every case on four paths, each with the project's own judging
code (in process, no network):

  hub replay          the hub's own float32 replay (verify.audit.audit)
  peer fp16 (same)    a float16 peer verifier, the host's own arithmetic: its
                      one prefill (verify.peer.reference_prefill), judged by
                      the hub (verify.peer.judge)
  peer fp16<->fp32    a float32 peer verifier against the float16 host
  logprob             what an ``--backend openai`` verifier reports: logprobs
                      and top-5 ranks only, no activations, no seeded sampler

The honest row gets --honest requests (default 3,000: no false positive in
3,000 bounds the rate at 0.1%, one-sided 95%); the attack rows --requests
each. Bounds are exact one-sided 95% Clopper-Pearson bounds.

Then: the honest spread per path and the thresholds ``calibrate`` /
``calibrate_logprobs`` derive from it next to the shipped ones; commitment
bytes per token; the commitment builder's share of host time; verifier cost
against the generation it checks, side by side per request; how many jobs a
lazy verifier answers before a known-answer job catches it.

    python bench/verify.py [--requests 1000] [--honest 3000] [--max-tokens 32] [--known-rate 0.05]
    python bench/verify.py --requests 40 --honest 40 --cost-requests 3   # quick
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one request, one core: as hosts run it
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import dataclasses
import math
import sys
import time
from collections import Counter

import numpy as np
from gpunexus.verify.attacks import HostOutput, other_model, quantized_copy, random_tokens
from gpunexus.verify.audit import AuditRequest, Verdict, audit
from gpunexus.verify.commitment import (
    TINY_THRESHOLDS,
    CommitmentBuilder,
    Thresholds,
    bytes_per_token,
    calibrate,
    commit,
)
from gpunexus.verify.generate import generate
from gpunexus.verify.peer import (
    RANK_UNKNOWN,
    TINY_LOGPROB_LIMITS,
    PrefillReport,
    calibrate_logprobs,
    judge,
    logprob_stats,
    reference_prefill,
)
from gpunexus.verify.registry import load_reference
from gpunexus.verify.sampler import SamplingParams

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "tell", "me", "story", "about", "hello", "world", "why", "how", "what", "river", "mountain", "code", "python", "market", "price", "token", "model", "answer", "question", "write", "poem"]
ROWS = ("honest", "other-model", "int4", "random+proof", "wrong-seed", "replay", "inflated", "early-stop")
PATHS = ("hub replay", "peer fp16 (same)", "peer fp16<->fp32", "logprob")
LOGPROB_TOP_K = 5


def logprob_only(report: PrefillReport) -> PrefillReport:
    """What an engine without activations or seeded sampler would report: logprobs and top-5 ranks."""
    ranks = tuple(r if r < LOGPROB_TOP_K else RANK_UNKNOWN for r in report.ranks)
    return dataclasses.replace(report, engine="openai", commitment=b"", ranks=ranks, top_k=LOGPROB_TOP_K,
                               seed_replayed=False, replay_reasons=())


def peer_verdict(r: AuditRequest, report: PrefillReport) -> Verdict:
    return judge(tokens_in=r.tokens_in, tokens_out=r.tokens_out, output_tokens=len(r.output_ids),
                 commitment=r.commitment, report=report, temperature=r.params.temperature)


def jobs_until_caught(rate: float, trials: int, rng: np.random.Generator) -> list[int]:
    """Per lazy verifier: jobs answered (audits and the known-answer one) until the first known-answer job.

    Each audit sends, with probability ``rate``, a known-bad job too (hub/peer_audit.py); the lazy
    verifier passes it and is caught there.
    """
    return [int(rng.geometric(rate)) + 1 for _ in range(trials)] if rate > 0 else []


def binom_cdf(k: int, n: int, p: float) -> float:
    if p <= 0:
        return 1.0
    if p >= 1:
        return 1.0 if k >= n else 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def upper95(k: int, n: int) -> float:
    """One-sided 95% Clopper-Pearson upper bound on a rate with k of n events."""
    if n == 0 or k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if binom_cdf(k, n, mid) > 0.05:
            lo = mid
        else:
            hi = mid
    return hi


def lower95(k: int, n: int) -> float:
    return 1.0 - upper95(n - k, n) if n else 0.0


def host_run(model, tok, prompt, params, with_commitment=True):
    """Honest decode; returns (HostOutput, hidden states, seconds in the builder)."""
    builder = CommitmentBuilder(model.config.dim) if with_commitment else None
    ids, hidden, finish, spent = [], [], "length", 0.0
    for t in generate(model, tok, prompt, params):
        ids.append(t.token_id)
        hidden.append(t.hidden)
        if builder is not None:
            t0 = time.perf_counter()
            builder.add(t.hidden)
            spent += time.perf_counter() - t0
        if t.finish_reason is not None:
            finish = t.finish_reason
    t0 = time.perf_counter()
    commitment = builder.finish() if builder is not None else b""
    spent += time.perf_counter() - t0
    return HostOutput(tuple(prompt), tuple(ids), finish, commitment, len(prompt), len(ids)), hidden, spent


def end_logprob(model, tok, prompt: list[int], body: list[int]) -> float:
    """log P(an end of sequence next) after prompt + body under ``model``: what a verifier's engine
    could say about a "stop" right there (one more position than the echo of the output scores)."""
    logits, _ = model.new_session().prefill_all(prompt + body)
    row = logits[-1].astype(np.float64)
    top = row.max()
    lse = top + math.log(float(np.exp(row - top).sum()))
    stops = row[sorted(tok.stop_ids)]
    return float(np.log(np.exp(stops - top).sum()) + top - lse)


def cell(vs: list[Verdict], honest: bool) -> str:
    n, flagged = len(vs), sum(not v.passed for v in vs)
    bound = f"<= {100 * upper95(flagged, n):.2f}%" if honest else f">= {100 * lower95(flagged, n):.1f}%"
    return f"{flagged}/{n} {100 * flagged / max(n, 1):.1f}% ({bound})"


def thresholds_text(t: Thresholds) -> str:
    return f"exp >= {t.min_exponent_match}, mean <= {t.max_mantissa_mean}, median <= {t.max_mantissa_median}, overlap >= {t.min_index_overlap}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000, help="audited requests per attack row and path")
    ap.add_argument("--honest", type=int, default=3000, help="audited honest requests per path (at least --requests)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--cost-requests", type=int, default=20, help="requests per output length in the cost table")
    ap.add_argument("--known-rate", type=float, default=0.05, help="known-answer job rate for the lazy-verifier row")
    args = ap.parse_args()
    honest_n = max(args.honest, args.requests)
    started = time.perf_counter()

    ref, tok = load_reference()
    host16, _ = load_reference(dtype=np.float16)
    cheap = other_model(host16, tok, weight_seed=7)
    int4 = quantized_copy(host16, bits=4)
    dim = ref.config.dim
    rng = np.random.default_rng(2025)

    def prompt_for(k: int) -> list[int]:
        words = np.random.default_rng(10_000 + k).choice(WORDS, 5)
        return tok.chat_prompt([{"role": "user", "content": " ".join(words)}])

    def params_for(k: int, seed: int, max_tokens: int = args.max_tokens) -> SamplingParams:
        r = np.random.default_rng(20_000 + k)
        return SamplingParams(
            temperature=float(r.choice([0.7, 1.0, 1.3])), top_p=float(r.choice([1.0, 0.95])),
            top_k=int(r.choice([0, 50])), max_tokens=max_tokens, seed=seed,
        )

    def req(h: HostOutput, p: SamplingParams, **kw) -> AuditRequest:
        fields = {
            "output_ids": h.output_ids, "params": p, "tokens_in": h.tokens_in, "tokens_out": h.tokens_out,
            "finish_reason": h.finish_reason, "commitment": h.commitment, "model_hash": ref.model_hash,
            "prompt_ids": h.prompt_ids,
        }
        fields.update(kw)
        return AuditRequest(**fields)

    verdicts: dict[str, dict[str, list[Verdict]]] = {path: {row: [] for row in ROWS} for path in PATHS}
    honest_logprobs = []
    honest_end: list[float] = []  # log P(end) where an honest output drew its stop token
    cut_end: list[float] = []  # log P(end) where an early-stop host cut its output
    builder_s = gen16_s = 0.0
    honest_tokens = commitment_bytes = 0

    def judge_all(row: str, r: AuditRequest) -> None:
        """One case on every path, each with its own prefill, as each verifier runs it."""
        report32 = reference_prefill(ref, tok, r, engine="reference-float32")
        lp = logprob_only(report32)
        got = {
            "hub replay": audit(ref, tok, r),
            "peer fp16 (same)": peer_verdict(r, reference_prefill(host16, tok, r, engine="reference-float16")),
            "peer fp16<->fp32": peer_verdict(r, report32),
            "logprob": peer_verdict(r, lp),
        }
        for path, v in got.items():
            verdicts[path][row].append(v)
        if row == "honest":
            honest_logprobs.append((logprob_stats(lp.logprobs, lp.ranks, lp.top_k), r.params.temperature))

    def honest_case(prompt: list[int], p: SamplingParams) -> tuple[HostOutput, list[np.ndarray]]:
        nonlocal builder_s, gen16_s, honest_tokens, commitment_bytes
        t0 = time.perf_counter()
        h, hidden, spent = host_run(host16, tok, prompt, p)
        gen16_s += time.perf_counter() - t0
        builder_s += spent
        return h, hidden

    def progress(what: str, done: int, total: int) -> None:
        if done % 100 == 0 or done == total:
            print(f"  {what}: {done}/{total} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    # Requests come in pairs sharing a prompt (seeds differ): each one's
    # partner is its "wrong seed" output. The previous pair's answers are the
    # "earlier answers" a replaying host serves; a warm-up pair seeds that.
    previous: list[HostOutput] | None = None
    audited = 0
    k = 0
    while audited < args.requests:
        prompt = prompt_for(k)
        pair = []
        for j in range(2):
            p = params_for(k, seed=2 * k + j + 1)
            pair.append((*honest_case(prompt, p), p))
        if previous is not None:
            for j, (h, hidden, p) in enumerate(pair):
                if audited == args.requests:
                    break
                audited += 1
                honest_tokens += len(h.output_ids)
                commitment_bytes += len(h.commitment)
                if h.finish_reason == "stop" and h.output_ids[-1] in tok.stop_ids:
                    honest_end.append(end_logprob(ref, tok, prompt, list(h.output_ids[:-1])))
                cases: dict[str, AuditRequest] = {"honest": req(h, p)}
                cases["other-model"] = req(host_run(cheap, tok, prompt, p)[0], p)
                cases["int4"] = req(host_run(int4, tok, prompt, p)[0], p)
                cases["random+proof"] = req(random_tokens(ref, tok, prompt, len(h.output_ids), rng), p)
                cases["wrong-seed"] = req(pair[1 - j][0], p)
                old = previous[j]
                cases["replay"] = req(old, p, prompt_ids=tuple(prompt), tokens_in=len(prompt))
                cases["inflated"] = req(h, p, tokens_out=h.tokens_out + int(rng.integers(1, 6)))
                if len(h.output_ids) > 1:  # a 1-token answer cannot be cut: that row's N is a little short
                    m = int(rng.integers(1, len(h.output_ids)))
                    cut = dataclasses.replace(h, output_ids=h.output_ids[:m], tokens_out=m, finish_reason="stop",
                                              commitment=commit(hidden[:m], dim))
                    cases["early-stop"] = req(cut, p)
                    cut_end.append(end_logprob(ref, tok, prompt, list(cut.output_ids)))
                for row, r in cases.items():
                    judge_all(row, r)
                progress("attack requests", audited, args.requests)
        previous = [h for h, _, _ in pair]
        k += 1
    for i in range(honest_n - args.requests):  # more honest requests, on prompts of their own
        p = params_for(100_000 + i, seed=1_000_000 + i)
        h, _ = honest_case(prompt_for(100_000 + i), p)
        judge_all("honest", req(h, p))
        progress("extra honest requests", i + 1, honest_n - args.requests)
    main_s = time.perf_counter() - started

    print(f"# gpunexus honesty bench: tiny reference model (numpy), float16 host; chat prompts of 5 words "
          f"(~33 tokens), outputs of up to {args.max_tokens} tokens")
    print(f"# {args.requests} audited requests per attack and path, {honest_n} honest; {main_s:.0f} s; "
          "flagged/N, rate (exact one-sided 95% bound)\n")
    print("| host | " + " | ".join(PATHS) + " |")
    print("|---|" + "---|" * len(PATHS))
    for row in ROWS:
        print(f"| {row} | " + " | ".join(cell(verdicts[path][row], row == "honest") for path in PATHS) + " |")
    print("\nwhat flagged them (failed checks, hub replay | peer fp16<->fp32 | logprob):\n")
    for row in ROWS[1:]:
        parts = []
        for path in ("hub replay", "peer fp16<->fp32", "logprob"):
            codes = Counter(c for v in verdicts[path][row] for c in v.codes)
            parts.append(", ".join(f"{c} {codes[c]}" for c in sorted(codes, key=lambda c: -codes[c])) or "-")
        print(f"  {row}: " + " | ".join(parts))

    print("\ncalibration per (engine, dtype pair), from the honest requests above:\n")
    print("| path | honest blocks | worst honest block | calibrate() thresholds |")
    print("|---|---|---|---|")
    for path in PATHS[:3]:
        blocks = [b for v in verdicts[path]["honest"] if v.stats.commitment for b in v.stats.commitment.blocks]
        if blocks:
            cal = calibrate(blocks)
            w = cal.worst
            print(f"| {path} | {cal.blocks} | exp {w.exponent_match:.3f}, mantissa mean {w.mantissa_mean:.2f} / "
                  f"median {w.mantissa_median:.1f} ulps, overlap {w.index_overlap:.3f} | {thresholds_text(cal.thresholds)} |")
    print(f"shipped TINY_THRESHOLDS (every path): {thresholds_text(TINY_THRESHOLDS)}")
    # As judge applies the limits: outputs of min_tokens or more, mean and outside share over max(1, T).
    judged = [dataclasses.replace(s, mean_logprob=s.mean_logprob / max(1.0, t), outside_top_k=s.outside_top_k / max(1.0, t))
              for s, t in honest_logprobs if s.n_tokens >= TINY_LOGPROB_LIMITS.min_tokens]
    if judged:
        lim = calibrate_logprobs(judged)
        print(f"logprob path, {len(judged)} honest outputs of {TINY_LOGPROB_LIMITS.min_tokens}+ tokens (mean and "
              f"outside share over max(1, temperature), as judge applies them): worst mean logprob "
              f"{min(s.mean_logprob for s in judged):.2f}, outside top-{LOGPROB_TOP_K} "
              f"{max(s.outside_top_k for s in judged):.2f}, longest improbable run "
              f"{max(s.longest_improbable_run for s in judged)} -> calibrate_logprobs(): mean >= "
              f"{lim.min_mean_logprob}, outside <= {lim.max_outside_top_k}, run <= {lim.max_improbable_run}; "
              f"shipped TINY_LOGPROB_LIMITS: mean >= {TINY_LOGPROB_LIMITS.min_mean_logprob}, outside <= "
              f"{TINY_LOGPROB_LIMITS.max_outside_top_k}, run <= {TINY_LOGPROB_LIMITS.max_improbable_run}")

    honest_v = verdicts["hub replay"]["honest"]
    near = sum(v.stats.near_ties for v in honest_v)
    print(f"\nhonest (hub replay): {near} float-noise near ties tolerated, worst replay distance "
          f"{max(v.stats.max_distance for v in honest_v):.2g}")
    n_avg = honest_tokens / max(args.requests, 1)
    print(f"commitment: {commitment_bytes / max(honest_tokens, 1):.2f} bytes/token measured (mean output "
          f"{n_avg:.1f} tokens); layout: {bytes_per_token(32, dim):.2f} B/token at 32 tokens, "
          f"{bytes_per_token(1024, dim):.2f} at 1024 (k=32 of dim {dim}, block 32); a dim-4096 model with "
          f"k=128: {bytes_per_token(1024, 4096, k=128):.1f} B/token (goal <= 10)")
    print(f"commitment builder: {100 * builder_s / gen16_s:.2f}% of float16 host generation time")

    print("\nthe logprob path's blind spots, measured on the same requests:")
    lp_mean = {row: np.array([v.stats.mean_logprob for v in verdicts["logprob"][row][: args.requests]]) for row in ROWS}
    print(f"  wrong-seed: not detectable without the seeded sampler. Another seed's output is an equally likely "
          f"draw (mean logprob per output: honest {lp_mean['honest'].mean():.2f}, wrong seed "
          f"{lp_mean['wrong-seed'].mean():.2f}); only a seed replay (hub, reference and exllamav2 verifiers) catches it.")
    shift = lp_mean["int4"] - lp_mean["honest"]  # paired: same prompt, parameters and seed
    every_honest = np.array([v.stats.mean_logprob for v in verdicts["logprob"]["honest"]])
    noise, floor = float(every_honest.std()), float(np.quantile(every_honest, 0.001))
    # The hub has no paired honest output: a host's average over n audits against the honest average.
    audits_needed = math.ceil((3.09 * noise / abs(float(shift.mean()))) ** 2) if shift.mean() else math.inf
    print(f"  int4: mean logprob per output {lp_mean['int4'].mean():.3f} vs honest {lp_mean['honest'].mean():.3f}: a shift "
          f"of {shift.mean():+.3f} (paired, same prompt and seed; sd {shift.std():.3f}) against an honest spread of "
          f"{noise:.3f} between outputs: below the noise of one audit ({100 * (lp_mean['int4'] < floor).mean():.1f}% of "
          f"int4 outputs fall below the honest 0.1% quantile {floor:.2f}). A host's average over its audits would "
          f"stand out from the honest average after ~{audits_needed} audits at this request mix (shift > 3.09 "
          f"standard errors); the hub judges each audit alone.")
    if cut_end and honest_end:
        # An honest host stops at a position with probability P(end) there, so flagging P(end) < tau
        # fails an honest stop with probability <= max_tokens * tau: tau for a 0.1% false-positive bound.
        tau = math.log(0.001 / args.max_tokens)
        cuts, stops = np.array(cut_end), np.array(honest_end)
        print(f"  early-stop: the echo scores the delivered tokens, not P(end of sequence) where the output stops "
              f"(a max_tokens=1 answer's top 5 only bounds it by the 5th likeliest token, far above any useful limit). "
              f"Were it reported: honest stops drew their end at log P(end) >= {stops.min():.2f} (median "
              f"{np.median(stops):.2f}, {len(stops)} outputs), cuts land at median {np.median(cuts):.2f}; flagging "
              f"log P(end) < {tau:.1f} (honest false positives <= 0.1% by construction, max_tokens {args.max_tokens}) "
              f"would catch {(cuts < tau).sum()}/{len(cuts)} = {100 * (cuts < tau).mean():.1f}% of cuts, and flag "
              f"{(stops < tau).sum()} honest stops. Not in verify.peer.judge: the result carries no such number.")

    print("\nverifier cost against the generation it checks (float32 host and verifiers; per request the fastest "
          "of 3 runs of each, interleaved; summed):\n")
    print("| max_tokens | requests | mean prompt + output tokens | generation | prefill alone | hub audit | peer verifier job |")
    print("|---|---|---|---|---|---|---|")
    for max_tokens in (args.max_tokens, 256):
        best = Counter()
        tokens = [0, 0]
        for i in range(args.cost_requests):
            prompt, p = prompt_for(50_000 + i), params_for(50_000 + i, seed=500_000 + i, max_tokens=max_tokens)
            times = dict.fromkeys(("gen", "prefill", "hub", "peer"), math.inf)
            for _ in range(3):
                t0 = time.perf_counter()
                h, _, _ = host_run(ref, tok, prompt, p)
                times["gen"] = min(times["gen"], time.perf_counter() - t0)
                r = req(h, p)
                t0 = time.perf_counter()
                ref.new_session().prefill_all(prompt + list(h.output_ids[:-1]))
                times["prefill"] = min(times["prefill"], time.perf_counter() - t0)
                t0 = time.perf_counter()
                audit(ref, tok, r)
                times["hub"] = min(times["hub"], time.perf_counter() - t0)
                t0 = time.perf_counter()
                reference_prefill(ref, tok, r, engine="reference-float32")
                times["peer"] = min(times["peer"], time.perf_counter() - t0)
            best.update(times)
            tokens[0] += len(prompt)
            tokens[1] += len(h.output_ids)
        n = max(args.cost_requests, 1)
        g = best["gen"]
        print(f"| {max_tokens} | {args.cost_requests} | {tokens[0] / n:.0f} + {tokens[1] / n:.0f} | "
              f"{1e3 * g / n:.1f} ms | {best['prefill'] / g:.3f} | {best['hub'] / g:.3f} | {best['peer'] / g:.3f} |")

    caught = jobs_until_caught(args.known_rate, 10_000, np.random.default_rng(11))
    if caught:
        print(f"\nlazy verifier (passes everything) at a {args.known_rate:.0%} known-answer rate, 10,000 simulated: "
              f"caught after {np.mean(caught):.1f} jobs on average (the audits until one comes with a known-answer "
              f"job, and that job), median {int(np.median(caught))}, 95th percentile {int(np.quantile(caught, 0.95))}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

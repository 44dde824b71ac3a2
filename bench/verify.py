"""Honesty bench: detection and false-positive rates of ``verify.audit``, and its costs.

For each of N requests (chat prompts of 5 random words, temperatures 0.7 /
1.0 / 1.3, top_p 1 / 0.95, top_k 0 / 50, up to --max-tokens tokens) it builds
what an honest host and seven cheating hosts would hand over, and audits each
with the float32 reference (one prefill per audit):

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

It stops starting new requests after --budget seconds, so N may fall short of
--n on a slow machine; the table prints the N reached and exact (Clopper-
Pearson) 95% bounds: for no flagged honest request the upper bound is ~3/N.

Then: commitment bytes per token, host tokens/s with the CommitmentBuilder on
and off, verifier time per audit against host generation time, and the
commitment thresholds ``commitment.calibrate`` derives from the honest blocks.

``--peer`` adds the peer-verifier paths (``verify.peer``) for every case:
``peer fp32`` (a float32 verifier's own commitment and replay, judged by the
hub: the float16 host against a float32 peer), ``peer fp16`` (a float16 peer,
the host's own arithmetic) and ``logprob`` (what an ``--backend openai``
verifier reports: logprobs and top-5 ranks only, judged statistically), with
the verifier's prefill time, the logprob limits ``calibrate_logprobs`` derives
from the honest outputs, and how many jobs a lazy verifier (passes
everything) gets before a known-answer job catches it at ``--known-rate``.

    python bench/verify.py [--n 1000] [--max-tokens 32] [--budget 150] [--peer] [--known-rate 0.05]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one request, one core: as hosts run it
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import dataclasses
import math
import time
from collections import Counter

import numpy as np
from gpunexus.verify.attacks import (
    HostOutput,
    other_model,
    quantized_copy,
    random_tokens,
)
from gpunexus.verify.audit import AuditRequest, Verdict, audit
from gpunexus.verify.commitment import (
    TINY_THRESHOLDS,
    CommitmentBuilder,
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
PATHS = ("hub replay", "peer fp32", "peer fp16", "logprob")
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
    if k >= n:
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
    return 1.0 - upper95(n - k, n)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="requests per row (goal)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--budget", type=float, default=150.0, help="seconds before no new request starts")
    ap.add_argument("--peer", action="store_true", help="also judge every case on the peer-verifier paths")
    ap.add_argument("--known-rate", type=float, default=0.05, help="known-answer job rate for the lazy-verifier row")
    args = ap.parse_args()
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

    def params_for(k: int, seed: int) -> SamplingParams:
        r = np.random.default_rng(20_000 + k)
        return SamplingParams(
            temperature=float(r.choice([0.7, 1.0, 1.3])), top_p=float(r.choice([1.0, 0.95])),
            top_k=int(r.choice([0, 50])), max_tokens=args.max_tokens, seed=seed,
        )

    def req(h: HostOutput, p: SamplingParams, **kw) -> AuditRequest:
        fields = {
            "output_ids": h.output_ids, "params": p, "tokens_in": h.tokens_in, "tokens_out": h.tokens_out,
            "finish_reason": h.finish_reason, "commitment": h.commitment, "model_hash": ref.model_hash,
            "prompt_ids": h.prompt_ids,
        }
        fields.update(kw)
        return AuditRequest(**fields)

    verdicts: dict[str, list[Verdict]] = {row: [] for row in ROWS}
    by_path: dict[str, dict[str, list[Verdict]]] = {path: {row: [] for row in ROWS} for path in PATHS[1:]}
    honest_logprobs = []
    peer_s: list[float] = []
    audit_s: list[float] = []
    gen16_s: list[float] = []
    builder_s = 0.0
    honest_tokens = 0
    commitment_bytes = 0
    # Requests come in pairs sharing a prompt (seeds differ): each one's
    # partner is its "wrong seed" output. The previous pair's answers are the
    # "earlier answers" a replaying host serves; a warm-up pair seeds that.
    previous: list[HostOutput] | None = None
    k = -1
    while True:
        k += 1
        if k > 0 and (2 * (k - 1) >= args.n or time.perf_counter() - started > args.budget):
            break
        prompt = prompt_for(k)
        pair = []
        for j in range(2):
            p = params_for(k, seed=2 * k + j + 1)
            t0 = time.perf_counter()
            h, hidden, spent = host_run(host16, tok, prompt, p)
            gen16_s.append(time.perf_counter() - t0)
            pair.append((h, hidden, p))
            builder_s += spent
        if previous is None:  # warm-up pair: not counted
            previous = [h for h, _, _ in pair]
            continue
        for j, (h, hidden, p) in enumerate(pair):
            honest_tokens += len(h.output_ids)
            commitment_bytes += len(h.commitment)
            cases: dict[str, AuditRequest] = {"honest": req(h, p)}
            cases["other-model"] = req(host_run(cheap, tok, prompt, p)[0], p)
            cases["int4"] = req(host_run(int4, tok, prompt, p)[0], p)
            cases["random+proof"] = req(random_tokens(ref, tok, prompt, len(h.output_ids), rng), p)
            partner = pair[1 - j][0]
            cases["wrong-seed"] = req(partner, p)
            old = previous[j]
            cases["replay"] = req(old, p, prompt_ids=tuple(prompt), tokens_in=len(prompt))
            cases["inflated"] = req(h, p, tokens_out=h.tokens_out + int(rng.integers(1, 6)))
            if len(h.output_ids) > 1:
                m = int(rng.integers(1, len(h.output_ids)))
                cut = dataclasses.replace(h, output_ids=h.output_ids[:m], tokens_out=m, finish_reason="stop",
                                          commitment=commit(hidden[:m], dim))
                cases["early-stop"] = req(cut, p)
            for row, r in cases.items():
                t0 = time.perf_counter()
                v = audit(ref, tok, r)
                if row == "honest":
                    audit_s.append(time.perf_counter() - t0)
                verdicts[row].append(v)
                if args.peer:
                    t0 = time.perf_counter()
                    report = reference_prefill(ref, tok, r, engine="reference-float32")
                    if row == "honest":
                        peer_s.append(time.perf_counter() - t0)
                    by_path["peer fp32"][row].append(peer_verdict(r, report))
                    by_path["peer fp16"][row].append(peer_verdict(r, reference_prefill(host16, tok, r, engine="reference-float16")))
                    lp = logprob_only(report)
                    by_path["logprob"][row].append(peer_verdict(r, lp))
                    if row == "honest":
                        honest_logprobs.append(logprob_stats(lp.logprobs, lp.ranks, lp.top_k))
        previous = [h for h, _, _ in pair]
    main_s = time.perf_counter() - started

    print(f"# gpunexus honesty bench (tiny reference model, fp16 host vs fp32 verifier, max_tokens={args.max_tokens})")
    print(f"# {len(verdicts['honest'])} requests per row in {main_s:.0f} s (goal {args.n}; budget {args.budget:.0f} s)\n")
    print("| host | N | flagged | rate | 95% bound | caught by |")
    print("|---|---|---|---|---|---|")
    for row in ROWS:
        vs = verdicts[row]
        n, flagged = len(vs), sum(not v.passed for v in vs)
        codes = Counter(c for v in vs for c in v.codes)
        by = ", ".join(f"{c} {codes[c]}" for c in sorted(codes, key=lambda c: -codes[c])) or "-"
        if row == "honest":
            bound = f"FP <= {100 * upper95(flagged, n):.2f}%"
        else:
            bound = f"detect >= {100 * lower95(flagged, n):.2f}%"
        print(f"| {row} | {n} | {flagged} | {100 * flagged / max(n, 1):.2f}% | {bound} | {by} |")

    if args.peer:
        print("\npeer-verifier paths (the hub judges what a verifier's one prefill reports, verify.peer.judge):\n")
        print("| host | " + " | ".join(f"{p} flagged (95% bound)" for p in PATHS) + " |")
        print("|---|" + "---|" * len(PATHS))
        for row in ROWS:
            cells = []
            for path in PATHS:
                vs = verdicts[row] if path == "hub replay" else by_path[path][row]
                n, flagged = len(vs), sum(not v.passed for v in vs)
                bound = f"<= {100 * upper95(flagged, n):.2f}%" if row == "honest" else f">= {100 * lower95(flagged, n):.2f}%"
                cells.append(f"{flagged}/{n} ({bound})")
            print(f"| {row} | " + " | ".join(cells) + " |")
        if honest_logprobs:
            lim = calibrate_logprobs(honest_logprobs)
            worst_mean = min(s.mean_logprob for s in honest_logprobs)
            print(f"\nlogprob calibration over {len(honest_logprobs)} honest outputs: worst mean logprob {worst_mean:.2f}, "
                  f"outside top-{LOGPROB_TOP_K} {max(s.outside_top_k for s in honest_logprobs):.2f}, "
                  f"longest improbable run {max(s.longest_improbable_run for s in honest_logprobs)}")
            print(f"  -> calibrate_logprobs(): mean >= {lim.min_mean_logprob}, outside <= {lim.max_outside_top_k}, "
                  f"run <= {lim.max_improbable_run}; shipped TINY_LOGPROB_LIMITS: mean >= "
                  f"{TINY_LOGPROB_LIMITS.min_mean_logprob}, outside <= {TINY_LOGPROB_LIMITS.max_outside_top_k}, "
                  f"run <= {TINY_LOGPROB_LIMITS.max_improbable_run}")
        caught = jobs_until_caught(args.known_rate, 10_000, np.random.default_rng(11))
        if caught:
            print(f"lazy verifier at a {args.known_rate:.0%} known-answer rate (10,000 simulated): caught after "
                  f"{np.mean(caught):.1f} jobs on average, median {int(np.median(caught))}, 95th percentile "
                  f"{int(np.quantile(caught, 0.95))}")

    honest_v = verdicts["honest"]
    near = sum(v.stats.near_ties for v in honest_v)
    print(f"\nhonest: {honest_tokens} tokens, {near} float-noise near ties tolerated by the replay, "
          f"worst replay distance {max(v.stats.max_distance for v in honest_v):.2g}")

    # Commitment size.
    n_avg = honest_tokens / max(len(honest_v), 1)
    print(f"commitment: {commitment_bytes / max(honest_tokens, 1):.2f} bytes/token measured "
          f"(mean output {n_avg:.1f} tokens); layout: {bytes_per_token(32, dim):.2f} B/token at 32 tokens, "
          f"{bytes_per_token(1024, dim):.2f} at 1024 (k=32 of dim {dim}, block 32); "
          f"a dim-4096 model with k=128: {bytes_per_token(1024, 4096, k=128):.1f} B/token")

    # Host speed with the builder on vs off: per request, off and on
    # alternate 5 times and the fastest of each counts (the machine is shared,
    # so means are noise); summed over 30 requests.
    best = {True: 0.0, False: 0.0}
    count = 0
    for kk in range(1, 31):
        times = {True: math.inf, False: math.inf}
        for _ in range(5):
            for on in (False, True):
                t0 = time.perf_counter()
                h, _, _ = host_run(ref, tok, prompt_for(kk), params_for(kk, 1), with_commitment=on)
                times[on] = min(times[on], time.perf_counter() - t0)
        count += len(h.output_ids)
        for on in (False, True):
            best[on] += times[on]
    tps_off, tps_on = count / best[False], count / best[True]
    gen16 = sum(gen16_s)
    print(f"host tokens/s (float32 decode, 30 requests, fastest of 5 each): commitments off {tps_off:.0f}, on {tps_on:.0f} "
          f"({100 * (tps_off - tps_on) / tps_off:+.1f}% slower end to end); "
          f"builder time alone {100 * builder_s / gen16:.2f}% of float16 host generation time")

    a_ms = 1e3 * float(np.mean(audit_s)) if audit_s else float("nan")
    g_ms = 1e3 * gen16 / max(len(gen16_s), 1)
    g32_ms = 1e3 * best[True] / 30
    print(f"verifier: {a_ms:.1f} ms per audited request (median {1e3 * float(np.median(audit_s)):.1f}) vs host generation "
          f"{g_ms:.1f} ms (float16 host) / {g32_ms:.1f} ms (float32 host) per request: "
          f"{a_ms / g32_ms:.2f}x a float32 generation")
    if peer_s:
        p_ms = 1e3 * float(np.mean(peer_s))
        print(f"peer verifier: {p_ms:.1f} ms per job (one prefill + replay + own commitment): "
              f"{p_ms / g32_ms:.2f}x a float32 generation")

    blocks = [b for v in honest_v if v.stats.commitment for b in v.stats.commitment.blocks]
    if blocks:
        cal = calibrate(blocks)
        w, t = cal.worst, cal.thresholds
        print(f"commitment calibration over {cal.blocks} honest blocks: worst exponent agreement {w.exponent_match:.3f}, "
              f"mantissa mean {w.mantissa_mean:.2f} / median {w.mantissa_median:.1f} ulps, index overlap {w.index_overlap:.3f}")
        print(f"  -> calibrate() thresholds: exp >= {t.min_exponent_match}, mean <= {t.max_mantissa_mean}, "
              f"median <= {t.max_mantissa_median}, overlap >= {t.min_index_overlap}; shipped TINY_THRESHOLDS: "
              f"exp >= {TINY_THRESHOLDS.min_exponent_match}, mean <= {TINY_THRESHOLDS.max_mantissa_mean}, "
              f"median <= {TINY_THRESHOLDS.max_mantissa_median}, overlap >= {TINY_THRESHOLDS.min_index_overlap}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

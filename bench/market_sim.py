"""Market price engine under a simulated week, plus its step response.

Runs `gpunexus.pricing.simulation` (the same code the tests assert on):

1. a step in demand (×2 and ×0.5) on three seeds each, measuring how many
   epochs the price takes to settle within 2% of its final value, how far it
   overshoots (as a share of the move) and how often it changes direction;
2. a week of five models with working-hours demand, night-and-weekend hosts,
   a launch surge, an outage, an underpricing host and a flapping host.

Writes ``market_sim.png`` (price, utilisation, queueing over the week; step
responses) to ``--out`` and prints the week's table last.

    python bench/market_sim.py [--out DIR] [--seed N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from gpunexus.pricing.simulation import (  # noqa: E402
    EPOCHS_PER_DAY_AT_60S,
    STEP_EPOCH,
    Run,
    simulate,
    step_response,
    step_scenario,
    summarise,
    week_scenario,
)

STEP_FACTORS = (2.0, 0.5)
STEP_SEEDS = (1, 2, 3)
COLD_START_EPOCHS = 120


def plot(week: Run, steps: dict[tuple[float, int], Run], path: Path) -> None:
    cfg = week.scenario.market.controller
    fig, axes = plt.subplots(4, 1, figsize=(12, 14))
    price_ax, u_ax, queue_ax, step_ax = axes
    for s in week.series:
        days = [i / EPOCHS_PER_DAY_AT_60S for i in range(len(s.price))]
        price_ax.plot(days, [p / s.reference_micro_per_mtok for p in s.price], lw=0.8, label=s.model)
        u_ax.plot(days, [min(u, 2.0) for u in s.utilisation], lw=0.5, label=s.model)
        queue_ax.plot(days, s.queue_s, lw=0.8, label=s.model)
    price_ax.set(ylabel="price / reference", title="market price (1.0 = ceiling)", ylim=(0, 1.05))
    lo, hi = cfg.target_utilisation - cfg.dead_band, cfg.target_utilisation + cfg.dead_band
    u_ax.axhspan(lo, hi, color="grey", alpha=0.25, label="target band")
    u_ax.set(ylabel="demand / supply", title="utilisation (market estimate, capped at 2)", ylim=(0, 2))
    # Scale to the week, not to the cold start (a market opening at half its reference price).
    warm = max(q for s in week.series for q in s.queue_s[COLD_START_EPOCHS:])
    queue_ax.set(
        ylabel="backlog (s of capacity)",
        xlabel="day (0 = Monday 00:00)",
        title=f"queueing (first {COLD_START_EPOCHS} epochs off the scale)",
        ylim=(0, 1.2 * warm),
    )
    for ax in (price_ax, u_ax, queue_ax):
        ax.legend(loc="upper right", fontsize=7, ncol=3)
        ax.set_xlim(0, week.scenario.epochs / EPOCHS_PER_DAY_AT_60S)
    for (factor, seed), run in steps.items():
        price = run.series[0].price
        final = step_response(price, STEP_EPOCH).after
        xs = range(-50, 150)
        step_ax.plot(xs, [price[STEP_EPOCH + x] / final for x in xs], lw=1, label=f"demand ×{factor}, seed {seed}")
    step_ax.axhspan(0.98, 1.02, color="grey", alpha=0.25, label="±2% of final")
    step_ax.set(xlabel="epochs since the step", ylabel="price / final price", title="step response")
    step_ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    started = time.perf_counter()

    steps = {(f, s): simulate(step_scenario(f, seed=s)) for f in STEP_FACTORS for s in STEP_SEEDS}
    week = simulate(week_scenario(seed=args.seed))
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "market_sim.png"
    plot(week, steps, png)

    print("step response (price settles within 2% of its final value):")
    print(
        f"{'demand':>7} {'seed':>4} {'before $/Mtok':>13} {'after $/Mtok':>12}"
        f" {'settle ep':>9} {'overshoot':>9} {'reversals':>9}"
    )
    for (factor, seed), run in steps.items():
        r = step_response(run.series[0].price, STEP_EPOCH)
        print(
            f"{'×' + str(factor):>7} {seed:>4} {r.before / 1e6:>13.4f} {r.after / 1e6:>12.4f}"
            f" {r.settle_epochs:>9} {r.peak_overshoot:>9.1%} {r.reversals:>9}"
        )
    print(f"\nplot: {png}   ({time.perf_counter() - started:.1f} s)\n")

    cfg = week.scenario.market.controller
    band = f"u±{cfg.dead_band:g}"
    near = f"u±{3 * cfg.dead_band:g}"
    print(
        f"week, seed {args.seed}, {week.scenario.epochs} epochs of {week.scenario.epoch_s:g} s,"
        f" target u {cfg.target_utilisation:g}, prices in $ per million tokens"
    )
    header = (
        f"{'model':<18} {'ceiling':>7} {'mean':>7} {'min':>7} {'max':>7} {'paid':>7} {'at ceil':>7} {band:>7} {near:>7}"
        f" {'served u':>8} {'p95 queue':>9} {'peak/ceil':>9} {'hosts':>6}"
    )
    print(
        "mean/min/max: market price; paid: what clients paid (under the market where a host underprices);"
        "\nat ceil: epochs priced at the reference (shortage); u±: epochs with the market's utilisation in"
        "\nthe dead band / three times it; peak/ceil: the dearest epoch's paid price over the reference\n"
    )
    print(header)
    print("-" * len(header))
    for s in week.series:
        m = summarise(s, cfg)
        print(
            f"{m.model:<18} {m.reference_usd:>7.3f} {m.mean_price_usd:>7.3f} {m.min_price_usd:>7.3f}"
            f" {m.max_price_usd:>7.3f} {m.mean_paid_usd:>7.3f} {m.at_ceiling:>7.0%} {m.in_band:>7.0%}"
            f" {m.near_band:>7.0%} {m.mean_served_u:>8.2f} {m.p95_queue_s:>8.1f}s"
            f" {m.max_effective_over_ceiling:>9.2f} {m.mean_hosts:>6.1f}"
        )


if __name__ == "__main__":
    main()

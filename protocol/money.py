"""Money units: integer micro-USD everywhere, never floats.

Prices are quoted in micro-USD per million tokens, so a price of 0.20 USD per
million tokens is ``200_000``. A request's cost is rounded *up* to a whole
micro-USD: a request is never free, and the rounding is at most one micro-USD
per receipt, in the host's favour, stated here once.
"""

from decimal import Decimal, InvalidOperation

MICRO_PER_USD = 1_000_000
TOKENS_PER_PRICE_UNIT = 1_000_000


def usd_to_micro(text: str | int | float | Decimal) -> int:
    """Parse a user-given dollar amount ("0.20", "5") exactly into micro-USD.

    Going through Decimal keeps "0.1" exact; anything finer than a micro-USD
    or negative is refused rather than silently rounded.
    """
    try:
        value = Decimal(str(text).strip())
    except InvalidOperation:
        raise ValueError(f"not a dollar amount: {text!r}") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"dollar amount must be a non-negative number: {text!r}")
    micro = value * MICRO_PER_USD
    if micro != micro.to_integral_value():
        raise ValueError(f"dollar amount finer than one micro-USD: {text!r}")
    return int(micro)


def micro_to_usd(micro: int) -> str:
    """Format micro-USD as an exact dollar string, e.g. 1_500_000 -> "1.500000"."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), MICRO_PER_USD)
    return f"{sign}{whole}.{frac:06d}"


def cost_micro(tokens: int, price_micro_per_mtok: int) -> int:
    """Cost of ``tokens`` at a price per million tokens, rounded up to a micro-USD."""
    if tokens < 0 or price_micro_per_mtok < 0:
        raise ValueError("tokens and price must be non-negative")
    return -(-tokens * price_micro_per_mtok // TOKENS_PER_PRICE_UNIT)

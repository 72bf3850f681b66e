"""What a million rows cost: this machine at an hourly price vs API list prices per token.

Prices live in ``recipes/api_prices.json`` (date, source, the VM the default hourly price stands
for, and per-API input/output prices per 1M tokens); the user edits that file, not code.
API cost per row = tokens in x input price + tokens out x output price, with the token counts
measured on this run (an API tokenizer counts somewhat differently; the order of magnitude holds).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError, require

PRICES_FILE = Path(__file__).resolve().parents[2] / "recipes" / "api_prices.json"
FALLBACK_VM_PRICE = 0.09   # USD/hour, a 2 vCPU cloud VM, used when the prices file is missing


def load_prices(path: str | Path | None = None) -> dict:
    p = Path(path) if path else PRICES_FILE
    if not p.is_file():
        return {"date": "?", "source": "built-in default", "vm": {"name": "small cloud VM",
                                                                   "usd_per_hour": FALLBACK_VM_PRICE}, "apis": []}
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: not valid JSON ({e.msg} at line {e.lineno}); fix the prices file") from None
    require(isinstance(data.get("apis", []), list), f"{p}: 'apis' must be a list of {{name, input, output}}")
    return data


def default_price_per_hour() -> float:
    return float(load_prices().get("vm", {}).get("usd_per_hour", FALLBACK_VM_PRICE))


def cost_rows(rows_per_s: float, tokens_in: float, tokens_out: float, price_per_hour: float,
              prices: dict | None = None) -> list[tuple[str, float]]:
    """(who, USD per 1M rows): this machine first, then every API in the prices file."""
    prices = load_prices() if prices is None else prices
    hours = 1e6 / rows_per_s / 3600 if rows_per_s > 0 else float("inf")
    out = [(f"this model at ${price_per_hour:g}/h", hours * price_per_hour)]
    for api in prices.get("apis", []):
        out.append((api["name"], tokens_in * api["input"] + tokens_out * api["output"]))  # 1M rows x per-1M-token price
    return out

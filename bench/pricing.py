"""Per-exchange cost of cost resolution (``resolve_cost``), the one pricing call on the proxy's path.

    .venv/bin/python bench/pricing.py [--number N]

Prints microseconds per call, best of 5 repeats, for each path a record can take: a reported
cost (Pulze), a database price (plain and dated), a ``--prices`` entry, and a model in no source.
Lookups are cached, so these are steady-state figures (the first call per model costs more).
"""

from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
import timeit

from llmtap.pricing.cost import Pricer, resolve_cost

BASE = {"input_tokens": 1234, "cached_input_tokens": 200, "output_tokens": 567, "provider": "openai"}
CASES = {
    "reported (Pulze metadata.costs)": {**BASE, "reported_cost_usd": 0.00066, "response_model": "gpt-4o"},
    "database, plain price (gpt-4.1-nano)": {**BASE, "response_model": "gpt-4.1-nano"},
    "database, dated price (o3)": {**BASE, "response_model": "o3"},
    "user file (--prices)": {**BASE, "response_model": "acme-llm"},
    "unknown (no source)": {**BASE, "response_model": "acme-unreleased"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as prices:
        json.dump({"acme-llm": {"input": 1, "output": 2}}, prices)
    pricer = Pricer.load(prices.name)
    now = time.time()
    for name, fields in CASES.items():
        fields = {**fields, "request_start": now}
        resolve_cost(fields, pricer)  # fill the caches
        call = functools.partial(resolve_cost, fields, pricer)
        best = min(timeit.repeat(call, number=args.number, repeat=5))
        print(f"{name:<40} {best / args.number * 1e6:6.2f} µs/call")


if __name__ == "__main__":
    main()

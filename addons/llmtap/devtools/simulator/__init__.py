"""A simulated upstream: the ground truth that the demo, the tests and the benchmarks use.

``server`` does HTTP, routing, faults and encodings; each family's wire format is one module
(``chat`` for Pulze / OpenAI / Azure OpenAI / OpenRouter Chat Completions). Every answer is
deterministic for a given prompt and seed.
"""

from __future__ import annotations

from llmtap.devtools.simulator.common import PRICES, REFERENCE_PRICE, ROUTER_MODELS, ListPrice, app_id_for, costs_for
from llmtap.devtools.simulator.encoding import ENCODINGS, encode_body
from llmtap.devtools.simulator.server import (
    FAMILY_FAULTS,
    FAULTS,
    TRUNCATE_AFTER,
    SimExchange,
    Simulator,
    run_simulator,
)

__all__ = [
    "ENCODINGS",
    "FAMILY_FAULTS",
    "FAULTS",
    "PRICES",
    "REFERENCE_PRICE",
    "ROUTER_MODELS",
    "TRUNCATE_AFTER",
    "ListPrice",
    "SimExchange",
    "Simulator",
    "app_id_for",
    "costs_for",
    "encode_body",
    "run_simulator",
]

"""llmtap: an observability and cost-tracking sidecar for LLM completion traffic."""

__version__ = "0.1.0"

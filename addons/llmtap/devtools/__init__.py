"""Tools for trying llmtap without a real provider: the simulated upstream, traffic, the demo."""

"""What an exchange cost, and where that price came from (see ``llmtap.pricing.cost``)."""

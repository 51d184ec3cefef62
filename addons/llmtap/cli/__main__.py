"""``python -m llmtap.cli``: the command line."""

from llmtap.cli import main

main()

"""Entry script for ``mitmdump -s addons/tap.py``: the code lives in the ``llmtap`` package."""

from llmtap.addon import LLMTap

addons = [LLMTap()]

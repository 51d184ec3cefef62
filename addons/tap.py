"""Entry script for ``mitmdump -s addons/tap.py``: the code lives in the ``llmtap`` package."""

from llmtap.capture.addon import LLMTap

addons = [LLMTap()]

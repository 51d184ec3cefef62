"""Who served an exchange, from what the names and the host say."""

from __future__ import annotations

#: Hosts whose provider is known without looking at the body.
PROVIDER_BY_HOST = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "api.mistral.ai": "mistralai",
    "api.groq.com": "groq",
    "api.deepseek.com": "deepseek",
    "api.together.xyz": "together",
    "api.perplexity.ai": "perplexity",
    "api.x.ai": "xai",
    "api.cohere.ai": "cohere",
    "api.cohere.com": "cohere",
    "openrouter.ai": "openrouter",
}


def provider_from(host: str | None, namespace: str | None, model: str | None) -> str | None:
    """Who served: ``provider/model`` names first, then well-known hosts."""
    for name in (namespace, model):
        if name and "/" in name:
            return name.split("/", 1)[0].lower()
    return PROVIDER_BY_HOST.get(host or "")

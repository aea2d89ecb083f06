"""The gateway: the OpenAI-compatible front door; routes by model name, proxies to workers."""

"""A server someone else runs, attached as a worker (engine openai)."""

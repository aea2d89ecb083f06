"""fleetserve: one OpenAI-compatible endpoint in front of many model workers.

This package holds what the controller, the gateway and the workers share:
the cluster file schema, the wire schemas, the error envelope and the CLI.
"""

__version__ = "0.1.0"

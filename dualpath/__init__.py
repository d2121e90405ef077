"""DualPath: dual-path KV-cache loading for agentic LLM inference."""

__version__ = "0.1.0"

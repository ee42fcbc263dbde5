"""metering-proxy: a metering reverse proxy for OpenAI-compatible and Anthropic LLM APIs."""

__version__ = "0.3.0"

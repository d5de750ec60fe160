"""openft: self-hosted LLM fine-tuning."""

__version__ = "0.1.0"

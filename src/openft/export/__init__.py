"""Exports of a fine-tuned model to the tools people run it in (vLLM; GGUF for
llama.cpp and Ollama next), each checked before it is written."""

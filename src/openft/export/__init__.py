"""Exports of a fine-tuned model to the tools people run it in (a Hugging Face
folder, vLLM, GGUF for llama.cpp, Ollama), each checked before it is written."""


class ExportRefused(ValueError):
    """An export that cannot be written as asked; `problems` names each reason."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))

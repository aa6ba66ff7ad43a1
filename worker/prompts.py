"""How the engine prompts a model: the Phi-3 vision cookbook's template, or chat messages for a processor with a
chat template."""

from __future__ import annotations


def phi3_prompt(n_images: int, question: str) -> str:
    """The prompt of the Phi-3 vision cookbook: numbered image placeholders, then the question, one user turn."""
    placeholders = "".join(f"<|image_{i}|>\n" for i in range(1, n_images + 1))
    return f"<|user|>\n{placeholders}{question}<|end|>\n<|assistant|>\n"


def chat_messages(n_images: int, question: str) -> list[dict]:
    """The same single user turn as chat messages, for models whose processor carries a chat template."""
    content = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]

"""The tasks visionq runs: their default questions, how many images each takes, and how each is prompted."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TaskSpec:
    """One kind of job: describe, ocr or compare."""

    name: str
    default_question: str
    min_images: int
    max_images: int | None  # None: bounded only by settings.max_images

    def question_or_default(self, question: str | None) -> str:
        """The user's question, or this task's default when none was given."""
        return question if question else self.default_question


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("describe", "Describe this image in detail.", 1, 1),
        TaskSpec("ocr", "Extract all the text in this image, in reading order.", 1, 1),
        TaskSpec("compare", "What is the difference between these images?", 2, None),
    )
}


def phi3_prompt(n_images: int, question: str) -> str:
    """The prompt of the Phi-3 vision cookbook: numbered image placeholders, then the question, one user turn."""
    placeholders = "".join(f"<|image_{i}|>\n" for i in range(1, n_images + 1))
    return f"<|user|>\n{placeholders}{question}<|end|>\n<|assistant|>\n"


def chat_messages(n_images: int, question: str) -> list[dict]:
    """The same single user turn as chat messages, for models whose processor carries a chat template."""
    content = [{"type": "image"} for _ in range(n_images)]
    content.append({"type": "text", "text": question})
    return [{"role": "user", "content": content}]

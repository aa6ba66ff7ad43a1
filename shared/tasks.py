"""The tasks visionq runs: their default questions and how many images each takes (worker/prompts.py prompts them)."""

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

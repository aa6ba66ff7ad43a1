"""Task definitions and the Phi-3 cookbook prompts."""

from shared.tasks import TASKS
from worker.prompts import chat_messages, phi3_prompt


def test_phi3_prompt_for_one_image_is_the_cookbook_string():
    assert phi3_prompt(1, "Describe this image in detail.") == (
        "<|user|>\n<|image_1|>\nDescribe this image in detail.<|end|>\n<|assistant|>\n"
    )


def test_phi3_prompt_for_compare_numbers_each_image():
    assert phi3_prompt(3, "Q?") == "<|user|>\n<|image_1|>\n<|image_2|>\n<|image_3|>\nQ?<|end|>\n<|assistant|>\n"


def test_default_questions_and_image_counts():
    assert TASKS["describe"].default_question == "Describe this image in detail."
    assert TASKS["ocr"].default_question == "Extract all the text in this image, in reading order."
    assert TASKS["compare"].default_question == "What is the difference between these images?"
    assert (TASKS["describe"].min_images, TASKS["describe"].max_images) == (1, 1)
    assert (TASKS["compare"].min_images, TASKS["compare"].max_images) == (2, None)
    assert TASKS["ocr"].question_or_default(None) == TASKS["ocr"].default_question
    assert TASKS["ocr"].question_or_default("Read it") == "Read it"


def test_chat_messages_put_images_before_the_question():
    assert chat_messages(2, "Q?") == [
        {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Q?"}]}
    ]

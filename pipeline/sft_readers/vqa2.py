"""VQA2 files (``v2_OpenEnded_mscoco_*_questions.json`` and ``v2_mscoco_*_annotations.json``): VQA, one example per
question, answered with the consensus ``multiple_choice_answer``. ``question_answers`` is the join that OK-VQA's
files (the same structure) use too."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from cm3.core.errors import InputError
from cm3.pipeline.sft_examples import Example
from cm3.pipeline.sft_readers import Format, Sources
from cm3.pipeline.sft_readers._records import field, image_ref, json_items, record_dict, text

QUESTIONS = "a VQA questions file: an object with a list 'questions'"
ANNOTATIONS = "a VQA annotations file: an object with a list 'annotations'"


def question_answers(sources: Sources, answer: Callable[[dict, str], str]) -> Iterator[Example]:
    """One example per question of ``--source`` (image_id, question, question_id), in the file's order, answered by
    ``answer(annotation, where)`` of its annotation in ``--annotations`` (question_id, image_id, ...). Only the
    answers are kept in memory; the published files list an image's questions together, so ``task_rows`` loads
    the image once. The image reference is the image_id."""
    questions, annotations = sources.source, sources.annotations
    answers: dict[object, tuple[object, str, str]] = {}
    for i, annotation in enumerate(json_items(annotations, "annotations.item", ANNOTATIONS)):
        where = f"{annotations}: annotations[{i}]"
        answers[field(record_dict(annotation, where), "question_id", where)] = (
            field(annotation, "image_id", where), answer(annotation, where), where)
    for i, question in enumerate(json_items(questions, "questions.item", QUESTIONS)):
        where = f"{questions}: questions[{i}]"
        image_id = image_ref(record_dict(question, where), "image_id", where)
        question_id = field(question, "question_id", where)
        if question_id not in answers:
            raise InputError(f"{where}: question_id {question_id!r} has no annotation in {annotations}")
        answer_image, answer_text, answer_where = answers[question_id]
        if answer_image != image_id:
            raise InputError(f"{answer_where}: image_id {answer_image!r} does not match image_id {image_id!r} "
                             f"of question_id {question_id!r} in {questions}")
        yield Example(f"{questions.name}:{question_id}", where, (image_id,), question=text(question, "question", where),
                      answer=answer_text)


def examples(sources: Sources, task: str) -> Iterator[Example]:
    return question_answers(sources, lambda annotation, where: text(annotation, "multiple_choice_answer", where))


FORMATS = {"vqa2": Format(examples, ("vqa",), "a VQA2 questions JSON", annotations="the VQA2 annotations JSON")}

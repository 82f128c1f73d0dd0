"""VQA2 files (questions and annotations): VQA rows, one per question, answered with the consensus answer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from cm3.core.errors import InputError
from cm3.core.files import PathLike
from cm3.pipeline.sft_readers import Reader
from cm3.pipeline.sft_readers._records import (ImageExamples, field, image_ref, json_list, load_json,
                                               single_image_rows, text_field)
from cm3.pipeline.sft_tasks import ImageLoader, TaskRow
from cm3.tokenizers.multimodal import MultimodalTokenizer


def vqa_rows(questions_json: PathLike, annotations_json: PathLike, tokenizer: MultimodalTokenizer,
             image_loader: ImageLoader, seed: int = 0, batch_size: int = 32) -> Iterator[TaskRow]:
    """VQA rows from VQA2 files (``questions``: image_id, question, question_id; ``annotations``:
    question_id, image_id, multiple_choice_answer), one per question, answered with the
    consensus ``multiple_choice_answer``; ``image_loader`` receives the image_id."""
    questions_path, annotations_path = Path(questions_json), Path(annotations_json)
    answers: dict[object, tuple[object, str, str]] = {}
    for i, annotation in enumerate(json_list(load_json(annotations_path), "annotations", annotations_path)):
        where = f"{annotations_path}: annotations[{i}]"
        answers[field(annotation, "question_id", where)] = (
            field(annotation, "image_id", where), text_field(annotation, ("multiple_choice_answer",), where), where)
    groups: dict[object, ImageExamples] = {}
    for i, question in enumerate(json_list(load_json(questions_path), "questions", questions_path)):
        where = f"{questions_path}: questions[{i}]"
        image_id, question_id = field(question, "image_id", where), field(question, "question_id", where)
        text = text_field(question, ("question",), where)
        if question_id not in answers:
            raise InputError(f"{where}: question_id {question_id!r} has no annotation in {annotations_path}")
        answer_image, answer, answer_where = answers[question_id]
        if answer_image != image_id:
            raise InputError(f"{answer_where}: image_id {answer_image!r} does not match image_id {image_id!r} "
                             f"of question_id {question_id!r} in {questions_path}")
        group = groups.setdefault(image_id, ImageExamples(image_ref(question, ("image_id",), where), where, []))
        group.examples.append((f"{questions_path.name}:{question_id}", text, answer))
    return single_image_rows(groups.values(), "vqa", "input_image_ids", tokenizer, image_loader, seed, batch_size)


READERS = {"vqa": Reader(vqa_rows, "a VQA2 questions JSON", annotations="the VQA2 annotations JSON")}

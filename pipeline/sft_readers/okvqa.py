"""OK-VQA files (``OpenEnded_mscoco_*2014_questions.json`` and ``mscoco_*2014_annotations.json``): VQA, one example
per question. The files have VQA2's structure, but an annotation has no ``multiple_choice_answer``: the answer is
the most common of its ten ``answers`` (each ``{"answer_id", "raw_answer", "answer_confidence", "answer"}``)."""

from __future__ import annotations

from collections.abc import Iterator

from cm3.pipeline.sft_examples import Example
from cm3.pipeline.sft_readers import Format, Sources
from cm3.pipeline.sft_readers._records import consensus
from cm3.pipeline.sft_readers.vqa2 import question_answers


def examples(sources: Sources, task: str) -> Iterator[Example]:
    return question_answers(sources, consensus)


FORMATS = {"okvqa": Format(examples, ("vqa",), "an OK-VQA questions JSON", annotations="the OK-VQA annotations JSON")}

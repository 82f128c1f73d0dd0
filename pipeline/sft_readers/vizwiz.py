"""VizWiz VQA annotations (``train.json``, ``val.json``): VQA, one example per question.

A file is a list of ``{"image", "question", "answers": [{"answer", "answer_confidence"}], "answer_type",
"answerable"}``. The answer is the most common of the ten crowd answers, as the VizWiz authors' baseline picks it;
questions that cannot be answered from their photo (``answerable`` 0) are kept, answered as their annotators
answered them ("unanswerable"). ``test.json`` has no answers and cannot be converted. The image reference is the
file name (``VizWiz_train_00000000.jpg``), found in the split's image folder.
"""

from __future__ import annotations

from collections.abc import Iterator

from cm3.core.errors import InputError
from cm3.pipeline.sft_examples import Example
from cm3.pipeline.sft_readers import Format, Sources
from cm3.pipeline.sft_readers._records import consensus, field, image_ref, json_items, record_dict, text

EXPECTED = "a VizWiz VQA annotations file: a list of {image, question, answers, answerable}"


def examples(sources: Sources, task: str) -> Iterator[Example]:
    path = sources.source
    for i, record in enumerate(json_items(path, "item", EXPECTED)):
        where = f"{path}: record {i}"
        ref = image_ref(record_dict(record, where), "image", where)
        question, answer = text(record, "question", where), consensus(record, where)
        if field(record, "answerable", where) not in (0, 1):
            raise InputError(f"{where}: 'answerable' must be 0 or 1, got {record['answerable']!r}")
        yield Example(f"{path.name}:{ref}", where, (ref,), question=question, answer=answer)


FORMATS = {"vizwiz": Format(examples, ("vqa",), "a VizWiz VQA annotations JSON (train.json or val.json)")}

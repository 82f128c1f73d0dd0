"""ScienceQA (Lu et al. 2022): ``problems.json`` with ``pid_splits.json``; VQA, one example per problem that has an
image, the multiple choice rendered as text.

``problems.json`` maps a problem id to ``{"question", "choices", "answer" (an index into choices), "hint",
"image" ("image.png" or null), "task", "grade", "subject", "topic", "category", "skill", "lecture", "solution",
"split"}``; ``pid_splits.json`` maps a split name (train, val, test, minival, ...) to problem ids. The question
reads like the authors' QCM prompt on one line, ``{question} Context: {hint} Options: (A) {choice} (B) ...``
(no Context when the hint is empty), and the answer is ``(B) {choice}``. Problems without an image are counted as
``no_image``. The image reference is ``{split}/{problem id}/{image}``, found in the data set's ``images`` folder.
"""

from __future__ import annotations

from collections.abc import Iterator

from cm3.core.errors import InputError
from cm3.pipeline.sft_examples import Example, Skipped
from cm3.pipeline.sft_readers import Format, Sources
from cm3.pipeline.sft_readers._records import field, items_list, json_pairs, load_json, record_dict, text

PROBLEMS = "ScienceQA's problems.json: an object of problems by id"
SPLITS = "ScienceQA's pid_splits.json: an object of problem-id lists by split name"


def examples(sources: Sources, task: str) -> Iterator[Example | Skipped]:
    path = sources.source
    wanted = split_ids(sources)
    found: set[str] = set()
    for pid, problem in json_pairs(path, PROBLEMS):
        where = f"{path}: {pid!r}"
        problem = record_dict(problem, where)
        choices = items_list(problem, "choices", where)
        if not all(isinstance(choice, str) for choice in choices):
            raise InputError(f"{where}: 'choices' must be a list of strings")
        choices = [choice.strip() for choice in choices]
        answer = field(problem, "answer", where)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise InputError(f"{where}: 'answer' must index 'choices' (0..{len(choices) - 1}), got {answer!r}")
        question, hint = text(problem, "question", where), text(problem, "hint", where)
        split = text(problem, "split", where)
        image = problem.get("image")
        if image is not None and (not isinstance(image, str) or not image.strip()):
            raise InputError(f"{where}: 'image' must be a file name or null, got {image!r}")
        found.add(pid)
        if wanted is not None and pid not in wanted:
            continue
        if image is None:
            yield Skipped(where, "no_image")
            continue
        options = " ".join(f"({chr(65 + i)}) {choice}" for i, choice in enumerate(choices))
        context = f" Context: {hint}" if hint else ""
        yield Example(f"{path.name}:{pid}", where, (f"{split}/{pid}/{image}",),
                      question=f"{question}{context} Options: {options}" if question else "",
                      answer=f"({chr(65 + answer)}) {choices[answer]}")
    unknown = [pid for pid in wanted or () if pid not in found]
    if unknown:
        raise InputError(f"{sources.splits}: {sources.split!r}: problem id {unknown[0]!r} is not in {path} "
                         f"({len(unknown)} such ids)")


def split_ids(sources: Sources) -> dict[str, None] | None:
    """The problem ids of ``--split`` in ``--splits``, or None (every problem) when neither is given."""
    if sources.splits is None and sources.split is None:
        return None
    if sources.splits is None or sources.split is None:
        raise InputError("ScienceQA takes --splits (pid_splits.json) and --split (a split name) together")
    splits = load_json(sources.splits, SPLITS)
    if not isinstance(splits, dict):
        raise InputError(f"{sources.splits}: expected {SPLITS}")
    if sources.split not in splits:
        raise InputError(f"{sources.splits}: no split {sources.split!r}; it has {', '.join(map(str, splits))}")
    ids = splits[sources.split]
    if not isinstance(ids, list) or not all(isinstance(pid, str) for pid in ids):
        raise InputError(f"{sources.splits}: {sources.split!r} must be a list of problem ids (strings)")
    return dict.fromkeys(ids)


FORMATS = {"scienceqa": Format(examples, ("vqa",), "ScienceQA's problems.json",
                               splits="ScienceQA's pid_splits.json (with --split)",
                               split="a split of pid_splits.json: train, val, test, minival, ...")}

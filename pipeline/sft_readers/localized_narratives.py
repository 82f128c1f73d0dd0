"""Localized Narratives (Pont-Tuset et al. 2020): the JSON Lines files of narratives, one example per narrative;
captioning and text-to-image from the caption, grounded generation from the mouse traces.

Each line is ``{"dataset_id", "image_id", "annotator_id", "caption", "timed_caption": [{"utterance",
"start_time", "end_time"}], "traces": [[{"x", "y", "t"}]], "voice_recording"}``, trace coordinates normalised to
the image (a little beyond 0..1 where the mouse left it). The ``*_captions.jsonl`` files have the caption only.
The image reference is the image_id, a string: COCO's files are named ``{:0>12}.jpg`` of it, Open Images',
Flickr30k's and ADE20k's ``{}.jpg``.

Grounded generation follows the data set's "from traces to boxes": an utterance's box is the box of the trace
points recorded while it was spoken (clipped to the image). Utterances made only of function words ("in this",
"there are") or words for the picture itself are not objects; a narrative without traces, or with no box left
inside the centre crop, is counted as ``no_boxes``.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator

from cm3.core.errors import InputError
from cm3.pipeline.sft_examples import Box, Example
from cm3.pipeline.sft_readers import Format, Sources
from cm3.pipeline.sft_readers._records import field, image_ref, items_list, jsonl_records, record_dict, text

FUNCTION_WORDS = frozenset("""
a an the this that these those there here it its it's is are was were be been being am i we you he she they me us
them my our your his her their in on at of to from with by for and or but as into onto over under above below near
behind beside between up down out off so then also just very some any all each other another which who what where
when how can could see seen visible image picture photo photograph view background foreground side left right
""".split())


def examples(sources: Sources, task: str) -> Iterator[Example]:
    path = sources.source
    for where, record in jsonl_records(path):
        ref = image_ref(record, "image_id", where)
        key = f"{path.name}:{ref}:{field(record, 'annotator_id', where)}"
        objects = trace_boxes(record, where) if task == "grounded_generation" else None
        yield Example(key, where, (ref,), caption=text(record, "caption", where), objects=objects, relative=True)


def trace_boxes(record: dict, where: str) -> tuple[tuple[str, Box], ...] | None:
    """(utterance, box in fractions of the image) of each utterance that names a thing; None without traces."""
    if record.get("traces") is None and record.get("timed_caption") is None:
        return None
    points = sorted(_point(point, f"{where}: traces[{i}][{j}]")
                    for i, segment in enumerate(items_list(record, "traces", where, nonempty=False))
                    for j, point in enumerate(_segment(segment, f"{where}: traces[{i}]")))
    times = [t for t, _, _ in points]
    objects = []
    for k, utterance in enumerate(items_list(record, "timed_caption", where, nonempty=False)):
        at = f"{where}: timed_caption[{k}]"
        words = text(record_dict(utterance, at), "utterance", at)
        start, end = _number(utterance, "start_time", at), _number(utterance, "end_time", at)
        spoken = points[bisect_left(times, start):bisect_right(times, end)]
        name = words.strip(" .,;:!?\"'")
        if spoken and _names_a_thing(name):
            xs, ys = [min(max(x, 0.0), 1.0) for _, x, _ in spoken], [min(max(y, 0.0), 1.0) for _, _, y in spoken]
            objects.append((name, (min(xs), min(ys), max(xs), max(ys))))
    return tuple(objects)


def _names_a_thing(words: str) -> bool:
    letters = ("".join(c for c in word if c.isalpha()) for word in words.lower().replace("'", "").split())
    return any(word and word not in FUNCTION_WORDS for word in letters)


def _segment(segment: object, where: str) -> list:
    if not isinstance(segment, list):
        raise InputError(f"{where}: a trace segment must be a list of points, got {type(segment).__name__}")
    return segment


def _number(record: dict, name: str, where: str) -> float:
    value = field(record, name, where)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise InputError(f"{where}: {name!r} must be a number, got {value!r}")
    return float(value)


def _point(point: object, where: str) -> tuple[float, float, float]:
    point = record_dict(point, where)
    return _number(point, "t", where), _number(point, "x", where), _number(point, "y", where)


FORMATS = {"localized-narratives": Format(examples, ("captioning", "text_to_image", "grounded_generation"),
                                          "a Localized Narratives JSON Lines file (narratives or captions only)")}

"""VQA accuracy as the VQA2 evaluation (``vqaEval.py``) computes it, and VizWiz uses it too.

An answer scores ``min(#humans who gave it / 3, 1)``, averaged over the ten leave-one-out sets of nine of the ten
human answers. The prediction is normalised (punctuation, number words to digits, articles dropped, missing
apostrophes restored); the human answers, already normalised in the data set, have their punctuation processed when
they disagree. The rules, quirks included, are the official script's, so numbers compare with published ones.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_CONTRACTIONS = dict(pair.split(":") for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've
didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't
havent:haven't hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've
I'dve:I'd've Im:I'm Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am
mightnt:mightn't mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've
neednt:needn't notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at
shant:shan't shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't
shouldnt've:shouldn't've shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've
somebody'dve:somebody'd've somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've
someone'dve:someone'd've someonell:someone'll someones:someone's somethingd:something'd
somethingd've:something'd've something'dve:something'd've somethingll:something'll thats:that's thered:there'd
thered've:there'd've there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've
they'dve:they'd've theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've
we'dve:we'd've weve:we've werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's
whered:where'd wheres:where's whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's
whove:who've whyll:why'll whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't
wouldnt've:wouldn't've wouldn'tve:wouldn't've yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've
y'alld've:y'all'd've y'all'dve:y'all'd've youd:you'd youd've:you'd've you'dve:you'd've youll:you'll youre:you're
youve:you've""".split())
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the official pattern: a full stop not followed by a digit
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def strip_punctuation(text: str) -> str:
    """Punctuation removed where it touches a space (or the text has a digit group comma), else made a space;
    then full stops not before a digit dropped (at most 32 of them, as the official call's stray argument says)."""
    out = text
    glued = _DIGIT_COMMA.search(text) is not None
    for mark in _PUNCTUATION:
        out = out.replace(mark, "" if glued or mark + " " in text or " " + mark in text else " ")
    return _PERIOD.sub("", out, 32)


def normalize_answer(text: str) -> str:
    """A predicted answer as the evaluation compares it: ``strip_punctuation``, lower case, number words as digits,
    no articles, apostrophes restored in contractions."""
    text = strip_punctuation(" ".join(text.replace("\n", " ").replace("\t", " ").split()))
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def question_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """One question's accuracy in [0, 1] against its (ten) human answers."""
    if not human_answers:
        raise ValueError("a question needs at least one human answer")
    answer = normalize_answer(prediction)
    humans = [a.replace("\n", " ").replace("\t", " ").strip() for a in human_answers]
    if len(set(humans)) > 1:
        humans = [strip_punctuation(a) for a in humans]
    scores = [min(1.0, sum(h == answer for j, h in enumerate(humans) if j != i) / 3) for i in range(len(humans))]
    return sum(scores) / len(scores)


def vqa_accuracy(predictions: Mapping[object, str], human_answers: Mapping[object, Sequence[str]]) -> dict:
    """Mean accuracy (0-100, as VQA reports it) of one predicted answer per question id."""
    if set(predictions) != set(human_answers) or not predictions:
        missing = sorted(map(str, set(predictions) ^ set(human_answers)))[:5]
        raise ValueError(f"predictions and human answers must cover the same questions (differ at {missing})")
    scores = [question_accuracy(predictions[q], human_answers[q]) for q in human_answers]
    return {"vqa_accuracy": 100.0 * sum(scores) / len(scores), "samples": len(scores)}

"""CIDEr and BLEU-4 as the COCO caption evaluation computes them: pycocoevalcap's own scorers, on captions tokenized
the way its Java PTBTokenizer (Stanford CoreNLP 3.4.1, ``-lowerCase``) tokenizes them, less its punctuation list.

``ptb_tokenize`` is that tokenizer in Python, so scoring needs no Java. On the 40,504 COCO val2014 captions of
coco-caption's sample submission it gives the Java tokenizer's words for all but 4 (docs/evaluation.md; the check is
``benchmarks/caption_tokenizer.py``). What it reproduces: lower case; punctuation, brackets (kept as ``-lrb-``,
``-rrb-``, ... since pycocoevalcap drops only the upper-case forms) and quotes split off; clitics (``'s``, ``n't``,
``'re``, ...) and ``cannot``/``gonna``/``wanna``/``gotta`` split; hyphenated words, numbers such as ``3.5``,
``1,000``, ``10:30`` and ``3/4``, acronyms (``u.s.``) and common abbreviations (``st.``, ``mr.``) kept whole.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "wanna": ["wan", "na"], "gotta": ["got", "ta"]}
_ABBREVIATIONS = set("""mr mrs ms dr prof st jr sr rd ave av blvd ln la mt ft hwy etc vs inc co corp ltd no penn
calif fla tex jan feb mar apr jun jul aug sep sept oct nov dec""".split())
_ACRONYM = re.compile(r"[a-z](?:\.[a-z])*\.?")
_SEPARATE = r",;()\[\]{}\"`$%#*"  # characters that are always a token of their own
_TOKEN = re.compile(rf"""
    \.\.\.+ | --+ | [?!]+ | [{_SEPARATE}]
  | [+-]?\d+(?:[.,:/]\d+)*(?=[\s{_SEPARATE}?!]|\.?$|\.\s)
  | [^\s{_SEPARATE}?!]+
""", re.VERBOSE)
_TIME = re.compile(r"(\d+:\d+)([a-z]+)")
_CLITIC = re.compile(r"(.+?)(n't|'s|'re|'ve|'ll|'d|'m)")
_DROPPED = frozenset(PUNCTUATIONS)


def _split_word(token: str) -> list[str]:
    """PTB's tokens of one lower-case chunk of text without spaces."""
    if token in _BRACKETS:
        return [_BRACKETS[token]]
    if token == '"':
        return ["''"]
    if token in _SPLIT_WORDS:
        return list(_SPLIT_WORDS[token])
    if "--" in token.strip("-"):
        head, _, tail = token.partition("--")
        return _split_word(head) + ["--"] + _split_word(tail)
    if len(token) > 1 and token[-1] in "-/>:":
        return _split_word(token[:-1]) + [token[-1]]
    if len(token) > 3 and token.endswith("..."):
        return _split_word(token[:-3]) + ["..."]
    if len(token) > 1 and token[0] in ".:" and token[1].isalpha():
        return [token[0]] + _split_word(token[1:])
    if len(token) > 1 and token.endswith("."):
        if _ACRONYM.fullmatch(token) or token[:-1] in _ABBREVIATIONS:
            return [token]
        return _split_word(token[:-1]) + ["."]
    if len(token) > 1 and token.startswith("'") and not _CLITIC.fullmatch("x" + token):
        return ["`"] + _split_word(token[1:])
    if len(token) > 1 and token.endswith("'"):
        return _split_word(token[:-1]) + ["'"]
    if time := _TIME.fullmatch(token):
        return [time.group(1), time.group(2)]
    if clitic := _CLITIC.fullmatch(token):
        return _split_word(clitic.group(1)) + [clitic.group(2)]
    return [token]


def ptb_tokenize(text: str) -> list[str]:
    """The Java PTBTokenizer's lower-case tokens of one caption (punctuation included)."""
    chunks = list(_TOKEN.finditer(text))
    tokens: list[str] = []
    for i, match in enumerate(chunks):
        chunk, before = match.group().lower(), text[match.start() - 1:match.start()]
        if chunk == '"' and (not before or before.isspace() or before in "([{"):
            tokens.append("``")  # an opening double quote
        elif i + 1 == len(chunks) and len(chunk) == 2 and chunk[0].isalpha() and chunk[1] == ".":
            tokens += [chunk[0], "."]  # a letter and a full stop that end the caption are no initial
        else:
            tokens += _split_word(chunk)
    return tokens


def coco_tokenize(text: str) -> str:
    """A caption as pycocoevalcap's scorers take it: PTB tokens less its punctuation list, joined by spaces."""
    return " ".join(token for token in ptb_tokenize(text.replace("\n", " ")) if token not in _DROPPED)


def caption_scores(references: Mapping[object, Sequence[str]], predictions: Mapping[object, str]) -> dict:
    """Corpus CIDEr (pycocoevalcap's, i.e. CIDEr-D) and BLEU-4 of one predicted caption per image against its
    reference captions; both mappings are keyed by image id and must hold the same ids."""
    if set(references) != set(predictions) or not predictions:
        missing = sorted(map(str, set(references) ^ set(predictions)))[:5]
        raise ValueError(f"references and predictions must cover the same images (differ at {missing})")
    if empty := [key for key, captions in references.items() if not captions]:
        raise ValueError(f"images {empty[:5]} have no reference captions")
    gts = {key: [coco_tokenize(c) for c in captions] for key, captions in references.items()}
    res = {key: [coco_tokenize(predictions[key])] for key in references}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {"cider": float(cider), "bleu4": float(bleu[3]), "samples": len(res)}

"""Check: the Python PTB tokenizer (``cm3.evaluation.caption_scores``) against the Java one pycocoevalcap runs
(Stanford CoreNLP 3.4.1's PTBTokenizer, shipped in its wheel), on the same captions, in one run: how many
captions the two turn into different words, which ones, and each one's time.

Needs ``java`` on the PATH (only this check does; ``cm3 eval`` never runs Java). Captions: any JSON list of
``{"caption": ...}`` or a COCO captions file, e.g. coco-caption's ``data/captions_val2014_submission.json``:

    .venv/bin/python benchmarks/caption_tokenizer.py captions_val2014_submission.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from pycocoevalcap.tokenizer import ptbtokenizer

from cm3.evaluation.caption_scores import coco_tokenize


def java_tokenize(captions: list[str]) -> list[str]:
    """pycocoevalcap's own command line and punctuation filter, one caption per line."""
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as handle:
        handle.write("\n".join(c.replace("\n", " ") for c in captions))
    try:
        lines = subprocess.run(["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
                                "-lowerCase", handle.name], capture_output=True, text=True, check=True).stdout
    finally:
        Path(handle.name).unlink()
    return [" ".join(w for w in line.rstrip().split(" ") if w not in ptbtokenizer.PUNCTUATIONS)
            for line in lines.split("\n")[:len(captions)]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("captions", type=Path)
    args = parser.parse_args()
    data = json.loads(args.captions.read_text())
    records = data["annotations"] if isinstance(data, dict) else data
    captions = [record["caption"] for record in records]
    start = time.perf_counter()
    java = java_tokenize(captions)
    java_s = time.perf_counter() - start
    start = time.perf_counter()
    python = [coco_tokenize(c) for c in captions]
    python_s = time.perf_counter() - start
    differ = [(c, j, p) for c, j, p in zip(captions, java, python) if j != p]
    for caption, j, p in differ[:20]:
        print(f"{caption!r}\n  java:   {j}\n  python: {p}")
    print(json.dumps({"captions": len(captions), "differ": len(differ),
                      "agreement": 1 - len(differ) / len(captions), "java_s": round(java_s, 2),
                      "python_s": round(python_s, 2)}))


if __name__ == "__main__":
    main()

"""Memory and time of reading a VQA2-sized question/annotation pair: cm3's streaming reader against json.load.

    .venv/bin/python benchmarks/sft_readers.py                # 200k questions (annotations file ~150 MB)
    .venv/bin/python benchmarks/sft_readers.py --n 20000

Writes both files in VQA2's structure (ten answers per annotation, as the published files have) to a temporary
folder, then runs each contender in a fresh process and reports how much its peak resident memory (ru_maxrss) grew
while reading, imports left out, and the reading time:

- **cm3**: one pass of ``formats()["vqa2"]``, the examples ``cm3 sft convert`` makes (no images opened);
- **json.load**: both files loaded whole with the standard library and the same join, as the readers did before
  they streamed.

It prints the ratios; the target is a reader whose memory grows with what it must join (an answer per question), not
with the size of the files, at no more than json.load's time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CM3 = """
from pathlib import Path
from cm3.pipeline.sft_readers import Sources, formats
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
n = sum(1 for _ in formats()["vqa2"].read("vqa2", "vqa", Sources(Path({q!r}), Path({a!r}))))
"""
PEER = """
import json
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
annotations = json.load(open({a!r}))["annotations"]
answers = {{x["question_id"]: (x["image_id"], x["multiple_choice_answer"].strip()) for x in annotations}}
del annotations
n = sum(1 for q in json.load(open({q!r}))["questions"] if answers[q["question_id"]][0] == q["image_id"])
"""


def write_files(folder: Path, n: int) -> tuple[Path, Path]:
    questions, annotations = folder / "questions.json", folder / "annotations.json"
    with questions.open("w") as out:
        out.write('{"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "questions": [')
        out.write(", ".join(json.dumps({"image_id": i // 3, "question": f"What is the object number {i} made of?",
                                        "question_id": i}) for i in range(n)))
        out.write("]}")
    with annotations.open("w") as out:
        out.write('{"info": {}, "data_type": "mscoco", "annotations": [')
        out.write(", ".join(json.dumps({
            "question_type": "what is the", "multiple_choice_answer": "wood",
            "answers": [{"answer": "wood", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)],
            "image_id": i // 3, "answer_type": "other", "question_id": i}) for i in range(n)))
        out.write("]}")
    return questions, annotations


def run(code: str) -> tuple[float, float]:
    """(MB the resident peak grew by while reading, seconds reading) of ``code`` in a fresh interpreter: the
    imports before the first ``before`` do not count."""
    probe = ("import resource, time\n" + code.replace("before = ", "start = time.perf_counter(); before = ", 1)
             + "\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, time.perf_counter() - start, n)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    grown_kb, seconds, _ = done.stdout.split()
    return int(grown_kb) / 1024, float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="questions (and annotations)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        questions, annotations = write_files(Path(tmp), args.n)
        size = annotations.stat().st_size / 2**20
        cm3_mb, cm3_s = run(CM3.format(q=str(questions), a=str(annotations)))
        peer_mb, peer_s = run(PEER.format(q=str(questions), a=str(annotations)))
    print(f"{args.n} questions, annotations file {size:.0f} MB (memory: growth of the resident peak while reading)")
    print(f"cm3 vqa2 reader : +{cm3_mb:6.0f} MB, {cm3_s:6.1f} s")
    print(f"json.load + join: +{peer_mb:6.0f} MB, {peer_s:6.1f} s")
    print(f"cm3 / json.load: memory {cm3_mb / peer_mb:.2f}x, time {cm3_s / peer_s:.2f}x")


if __name__ == "__main__":
    main()

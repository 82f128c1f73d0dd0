"""Evaluation: the paper's measures on data a user supplies (``cm3 eval``; docs/evaluation.md says what each means).

    inception.py        the FID network (torch-fidelity's Inception), loaded from a local file, never downloaded
    frechet.py          Fréchet distance between two feature sets: FID (Inception space), FD-CLIP (CLIP space)
    clip_scores.py      CLIP score and FD-CLIP with an OpenCLIP model
    caption_scores.py   CIDEr and BLEU-4 with pycocoevalcap's scorers and a Java-free PTB tokenizer
    vqa_accuracy.py     VQA2's answer normalisation and soft accuracy
    sources.py          prompts, reference images and caption / VQA references in the formats users have
    samples.py          generated images kept in shards, so a re-run resumes and never generates twice
    options.py          what each ``cm3 eval`` command takes (its defaults), without torch
    text_to_image.py    a text-to-image run: one row per setting (the ablations), its metrics
    image_to_text.py    captioning and VQA runs
    report.py           metrics.json and report.md
"""

from cm3.core.exports import lazy_exports

_EXPORTS = {  # public name -> the module that defines it
    "TextToImageOptions": "options", "ImageToTextOptions": "options", "evaluate_text_to_image": "text_to_image",
    "evaluate_captions": "image_to_text", "evaluate_vqa": "image_to_text", "frechet_distance": "frechet",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

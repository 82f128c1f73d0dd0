"""The evaluation measures against their definitions: FID and FD-CLIP (0 for a set against itself, growing with a
shift), CLIP score against a direct OpenCLIP computation, CIDEr / BLEU-4 against pycocoevalcap on Java-tokenized
text, VQA accuracy on hand-computed answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from cm3.core.errors import InputError
from cm3.evaluation.caption_scores import caption_scores, coco_tokenize, ptb_tokenize
from cm3.evaluation.clip_scores import clip_score, fd_clip
from cm3.evaluation.frechet import FeatureStatistics, frechet_distance, statistics
from cm3.evaluation.inception import WEIGHTS_FILE, inception_features, load_inception, resolve_weights
from cm3.evaluation.sources import read_caption_references
from cm3.evaluation.vqa_accuracy import normalize_answer, question_accuracy, vqa_accuracy
from factories import save_random_clip, save_random_inception

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return load_inception(save_random_inception(tmp_path_factory.mktemp("fid") / "inception.pth"))


def random_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_fid_of_a_set_against_itself_is_zero_and_grows_as_the_other_set_is_shifted(inception):
    images = random_images(5, seed=0)
    shifted = [images.int().add(shift).clamp(0, 255).to(torch.uint8) for shift in (8, 64)]
    features = inception_features(inception, [images, *shifted])  # one pass: 15 images
    assert features.shape == (15, 2048) and features.dtype == torch.float64 and features.std() > 0
    own, near, far = (statistics(features[i:i + 5]) for i in (0, 5, 10))
    assert abs(frechet_distance(own, own)) < 1e-6
    assert 1e-3 < frechet_distance(own, near) < frechet_distance(own, far)


def test_statistics_survive_the_reference_cache(tmp_path):
    stats = statistics(np.random.default_rng(0).normal(size=(6, 4)))
    stats.save(tmp_path / "fid.npz")
    loaded = FeatureStatistics.load(tmp_path / "fid.npz")
    assert loaded.count == 6 and np.array_equal(loaded.mu, stats.mu) and np.array_equal(loaded.sigma, stats.sigma)
    with pytest.raises(ValueError, match="at least 2"):
        statistics(np.zeros((1, 4)))


class NotATensor:
    pass


def test_inception_weights_are_checked_and_never_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(InputError) as missing:
        resolve_weights(None)
    cache = tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_FILE
    assert str(cache) in str(missing.value) and "--inception" in str(missing.value)
    with pytest.raises(InputError, match="nothing is downloaded"):
        resolve_weights(tmp_path / "absent.pth")
    torch.save({"weight": NotATensor()}, tmp_path / "code.pth")  # unpickling it would import a class: refused
    with pytest.raises(InputError, match="code.pth: cannot be read as weights"):
        load_inception(tmp_path / "code.pth")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="other.pth: not the FID Inception's weights"):
        load_inception(tmp_path / "other.pth")
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"")
    assert resolve_weights(None) == cache


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from cm3.tokenizers.clip_embedder import ClipEmbedder

    identity = save_random_clip(tmp_path_factory.mktemp("clip") / "clip.safetensors")
    return ClipEmbedder(identity["model_name"], identity["pretrained"])


def test_clip_score_equals_a_direct_open_clip_computation(clip):
    import open_clip
    from PIL import Image

    images = [np.asarray(random_images(1, seed=i, size=48)[0].permute(1, 2, 0)) for i in range(4)]
    texts = ["a red circle", "a blue square", "a green triangle on white", "a photo"]
    model, _, preprocess = open_clip.create_model_and_transforms(clip.model_name, pretrained=clip.pretrained)
    model.eval()
    tokenizer = open_clip.get_tokenizer(clip.model_name)
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(Image.fromarray(i)) for i in images]))
        text = model.encode_text(tokenizer(texts))
    cosine = torch.nn.functional.cosine_similarity(image, text).numpy()
    assert clip_score(images, texts, clip) == pytest.approx(float((100 * np.maximum(cosine, 0)).mean()), abs=1e-4)
    inverted = [255 - image for image in images]  # a random CLIP puts every image close together: small distances
    assert abs(fd_clip(images, images, clip)) < 1e-10
    assert fd_clip(images, inverted, clip) > 1e-7


# Captions and what Stanford CoreNLP 3.4.1's PTBTokenizer (-preserveLines -lowerCase, the jar pycocoevalcap runs)
# printed for them.
JAVA_TOKENS = {
    "A man's dog, (black) sits on a \"red\" couch.": "a man 's dog , -lrb- black -rrb- sits on a `` red '' couch .",
    "Two dogs don't play-fight in the snow... Really?!": "two dogs do n't play-fight in the snow ... really ?!",
    "A 3.5 ft. tall man & his $5 hat; it's 10:30am.": "a 3.5 ft. tall man & his $ 5 hat ; it 's 10:30 am .",
    "I cannot go, gonna wanna gotta.": "i can not go , gon na wan na got ta .",
    "The dogs' bowl isn't [x] {y} ok": "the dogs ' bowl is n't -lsb- x -rsb- -lcb- y -rcb- ok",
    "The photo shows the beach--kite flying": "the photo shows the beach -- kite flying",
    "A cat sitting on top of a D.V.D player. ": "a cat sitting on top of a d.v.d player .",
}


@pytest.mark.parametrize("text", list(JAVA_TOKENS))
def test_the_python_tokenizer_gives_the_java_tokenizers_tokens(text):
    assert " ".join(ptb_tokenize(text)) == JAVA_TOKENS[text]


COCO = {"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}, {"id": 3, "file_name": "c.jpg"}],
        "annotations": [{"image_id": 1, "id": 10, "caption": "A man's dog sits on a red couch."},
                        {"image_id": 1, "id": 11, "caption": "A dog (black) on a sofa"},
                        {"image_id": 2, "id": 12, "caption": "Two zebras, standing in the grass."},
                        {"image_id": 2, "id": 13, "caption": "A pair of zebras grazing"},
                        {"image_id": 3, "id": 14, "caption": "A plate of food on a table!"}]}
# The same references after the Java tokenizer and pycocoevalcap's punctuation filter.
TOKENIZED = {0: ["a man 's dog sits on a red couch", "a dog -lrb- black -rrb- on a sofa"],
             1: ["two zebras standing in the grass", "a pair of zebras grazing"], 2: ["a plate of food on a table"]}
PREDICTED = {0: "A dog on a red couch.", 1: "Zebras standing in grass", 2: "A cat on a table."}


def test_cider_and_bleu4_equal_pycocoevalcap_on_a_coco_format_fixture(tmp_path):
    (tmp_path / "captions.json").write_text(json.dumps(COCO))
    references = read_caption_references(tmp_path / "captions.json")
    assert [r.image for r in references] == ["a.jpg", "b.jpg", "c.jpg"]
    refs = {i: r.captions for i, r in enumerate(references)}
    assert {i: [coco_tokenize(c) for c in captions] for i, captions in refs.items()} == TOKENIZED
    res = {i: [coco_tokenize(p)] for i, p in PREDICTED.items()}
    scores = caption_scores(refs, PREDICTED)
    assert scores["cider"] == pytest.approx(Cider().compute_score(TOKENIZED, res)[0], abs=1e-12)
    assert scores["bleu4"] == pytest.approx(Bleu(4).compute_score(TOKENIZED, res, verbose=0)[0][3], abs=1e-12)
    assert scores["samples"] == 3 and scores["cider"] > 0
    with pytest.raises(ValueError, match="same images"):
        caption_scores(refs, {0: "a dog"})


def test_vqa_accuracy_on_hand_computed_answers():
    assert normalize_answer("Two dogs.") == "2 dogs" and normalize_answer("The dont!") == "don't"
    humans = {"two": ["2"] * 2 + ["3"] * 8,  # 8 subsets see 2 matches, 2 see 1: (8 * 2/3 + 2 * 1/3) / 10
              "yes": ["yes"] * 10,
              "the dog.": ["dog"] * 3 + ["cat"] * 7,  # 3 subsets see 2 matches, 7 see 3: (3 * 2/3 + 7) / 10
              "none": ["zero"] * 10}  # all humans agree: their answers are compared as given, "0" != "zero"
    expected = {"two": 0.6, "yes": 1.0, "the dog.": 0.9, "none": 0.0}
    for answer, want in expected.items():
        assert question_accuracy(answer, humans[answer]) == pytest.approx(want)
    result = vqa_accuracy({q: q for q in humans}, humans)
    assert result == {"vqa_accuracy": pytest.approx(100 * 2.5 / 4), "samples": 4}

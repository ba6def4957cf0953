"""Query by image: the memorization prompt `<image>` with a query image, decoded under the identifier trie.

On a tiny random model: the scores are the teacher-forced log-probabilities of `<image>id <ID><|endofchunk|>`, the
fast decoder ranks as `generate`, bad images are refused naming the file. On the same model trained for a few seconds
on the memorization task (i2id) over 8 pictures: a perturbed copy (crop, resize, JPEG) finds its picture, through the
retriever, `grace-hf retrieve --image`, the pipeline and the app's `/search_image` endpoint.
"""

import io
import json
import math
import random

import pytest
import torch
from PIL import Image, ImageDraw

from benchmarks.serve_clients import serve_subprocess
from grace_hf.commands import cli
from grace_hf.dense.model import DualEncoder
from grace_hf.errors import GraceInputError
from grace_hf.prompts import image_query_prompt
from grace_hf.retrieval import GraceRetriever, RetrievedImage
from grace_hf.retrieval.collection import identifier_token_ids
from grace_hf.retrieval.rerank import DenseScorer, Reranker
from grace_hf.retrieval.retriever import merge_views, query_views
from grace_hf.training.collate import GraceCollator
from tests.helpers import IMAGES, build_tiny_model_dir

COLLECTION = IMAGES[4:]  # the tiny model directory's default candidates


def picture(n: int) -> Image.Image:
    """A distinct 48x48 picture per n: a background colour and a bar at its own place."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200), (30, 200, 200)]
    image = Image.new("RGB", (48, 48), colours[n % 6] if n < 6 else (240 - 200 * (n - 6), 240 - 200 * (n - 6), 128))
    ImageDraw.Draw(image).rectangle([4 + 4 * n, 4, 20 + 4 * n, 30], fill=(255 - 30 * n, 30 * n, 128))
    return image


def perturbed(image: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop of up to 4 pixels a side, resized to 40x40, re-encoded as JPEG (quality 70)."""
    w, h = image.size
    box = (rng.randint(0, 4), rng.randint(0, 4), w - rng.randint(0, 4), h - rng.randint(0, 4))
    buffer = io.BytesIO()
    image.crop(box).resize((40, 40)).save(buffer, "JPEG", quality=70)
    return Image.open(io.BytesIO(buffer.getvalue()))


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("random"))


@pytest.fixture(scope="module")
def random_retriever(random_dir):
    return GraceRetriever.from_pretrained(random_dir, device="cpu")


@pytest.fixture(scope="module")
def memorized(tmp_path_factory):
    """The tiny model trained on i2id over the 8 collection images (as `picture(n)`), saved: `(model directory,
    {image key: picture}, folder of the pictures as files)`."""
    root = tmp_path_factory.mktemp("memorized")
    retriever = GraceRetriever.from_pretrained(build_tiny_model_dir(root / "start"), device="cpu")
    pictures = {key: picture(n) for n, key in enumerate(COLLECTION)}
    for key, image in pictures.items():
        (root / "images" / key).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / "images" / key)
    rows = [{"image": image, "identifier": retriever.index.images[key][0]} for key, image in pictures.items()]
    batch = GraceCollator(retriever.processor, "i2id")(rows)
    model = retriever.model.train()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(400):  # until memorized (about 120 steps; the count varies with the machine's float kernels)
        loss = model(**batch).loss
        if loss.item() < 0.05:
            break
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert model(**batch).loss.item() < 0.05
    model.eval()
    retriever.save_pretrained(root / "model")
    return root / "model", pictures, root / "images"


# the decoding, on a random model


def teacher_forced_log_prob(retriever, image, identifier):
    """log P(`id <identifier><|endofchunk|>` | `<image>` with `image`) by one forward pass."""
    processor = retriever.processor
    tokens = torch.tensor(identifier_token_ids(processor, [identifier]))  # (1, L)
    batch = processor(text=[image_query_prompt()], images=[image], return_tensors="pt")
    input_ids = torch.cat([batch["input_ids"], tokens], dim=1)
    with torch.no_grad():
        logits = retriever.model(input_ids=input_ids, pixel_values=batch["pixel_values"]).logits  # (1, P + L, V)
    log_probs = logits[0, batch["input_ids"].shape[1] - 1 : -1].log_softmax(-1)  # (L, V)
    return log_probs.gather(1, tokens.T).sum().item()


def test_exhaustive_image_query_scores_are_the_memorization_log_probabilities(memorized):
    model_dir, pictures, _ = memorized
    retriever = GraceRetriever.from_pretrained(model_dir, device="cpu")  # trained: the image changes the scores
    query = pictures[COLLECTION[2]]
    hits = retriever.retrieve(images=[query], top_k=100)[0]
    assert len(hits) == len(COLLECTION) and {hit.image_key for hit in hits} == set(COLLECTION)
    expected = {i: teacher_forced_log_prob(retriever, query, i) for i in retriever.identifiers}
    assert [hit.identifier for hit in hits] == sorted(expected, key=expected.get, reverse=True)
    assert [hit.score for hit in hits] == pytest.approx([expected[hit.identifier] for hit in hits], abs=1e-4)


def test_fast_decoding_ranks_images_like_generate_and_batches_do_not_matter(random_dir):
    images = [picture(n) for n in range(3)]
    slow = GraceRetriever.from_pretrained(random_dir, device="cpu", decoding="generate")
    fast = GraceRetriever.from_pretrained(random_dir, device="cpu", decoding="fast")
    for ranking in (fast.retrieve(images=images, top_k=5), slow.retrieve(images=images, top_k=5, batch_size=1)):
        expected = slow.retrieve(images=images, top_k=5)
        assert [[h.image_key for h in hits] for hits in ranking] == [[h.image_key for h in hits] for hits in expected]
        for hits, reference in zip(ranking, expected):
            assert {h.image_key for h in hits} <= set(COLLECTION)
            assert [h.score for h in hits] == pytest.approx([h.score for h in reference], abs=1e-4)


def test_one_image_a_path_and_a_pil_image_give_the_same_ranking(random_retriever, tmp_path):
    picture(1).save(tmp_path / "query.png")
    by_path = random_retriever.retrieve(images=tmp_path / "query.png", top_k=3)
    by_image = random_retriever.retrieve(images=[Image.open(tmp_path / "query.png")], top_k=3)
    assert len(by_path) == 1 and by_path == by_image


def test_merge_views_averages_each_images_probability_over_a_query_and_its_crops():
    hits = [
        [RetrievedImage("a", "1", math.log(0.5)), RetrievedImage("b", "2", math.log(0.3))],  # query 1
        [RetrievedImage("b", "2", math.log(0.4)), RetrievedImage("c", "3", math.log(0.2))],  # its crop
        [RetrievedImage("c", "3", math.log(0.9))],  # query 2
        [RetrievedImage("c", "3", math.log(0.8))],  # its crop
    ]
    first, second = merge_views(hits, 2)
    assert [(h.image_key, h.identifier) for h in first] == [("b", "2"), ("a", "1"), ("c", "3")]
    assert [h.score for h in first] == pytest.approx([math.log(0.35), math.log(0.25), math.log(0.1)])
    assert [h.image_key for h in second] == ["c"] and second[0].score == pytest.approx(math.log(0.85))
    assert merge_views(hits, 1) is hits


def test_image_views_search_each_query_image_and_its_crops(memorized, monkeypatch):
    model_dir, pictures, _ = memorized
    retriever = GraceRetriever.from_pretrained(model_dir, device="cpu")
    queries = [pictures[COLLECTION[2]], pictures[COLLECTION[5]]]
    searched = []
    search = GraceRetriever._search_all
    monkeypatch.setattr(GraceRetriever, "_search_all", lambda self, q, *a: searched.append(q) or search(self, q, *a))
    ranked = retriever.retrieve(images=queries, top_k=3, image_views=2)
    views = searched[-1]
    assert len(views) == 6  # each image, then its 2 crops
    assert views[0].tobytes() == queries[0].tobytes() and views[3].tobytes() == queries[1].tobytes()
    assert all(view.size == queries[0].size for view in views) and views[1].tobytes() != queries[0].tobytes()
    assert [view.tobytes() for view in query_views(queries[0], 2)] == [view.tobytes() for view in views[:3]]
    assert [hits[0].image_key for hits in ranked] == [COLLECTION[2], COLLECTION[5]] and all(
        len(h) == 3 for h in ranked
    )
    alone = retriever.retrieve(images=queries, top_k=3)
    assert ranked != alone and [h.image_key for h in alone[0]][:1] == [COLLECTION[2]]
    with pytest.raises(GraceInputError, match=r"image_views must be an integer in \[0, 32\]"):
        retriever.retrieve(images=queries, image_views=-1)
    with pytest.raises(GraceInputError, match="needs query images"):
        retriever.retrieve(["a red square"], image_views=2)


def test_bad_image_queries_are_refused_naming_the_file(random_retriever, tmp_path):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    buffer = io.BytesIO()
    Image.effect_noise((48, 48), 64).save(buffer, "PNG")
    (tmp_path / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(GraceInputError, match="exactly one"):
        random_retriever.retrieve(["a dog"], images=[picture(0)])
    with pytest.raises(GraceInputError, match="exactly one"):
        random_retriever.retrieve()
    with pytest.raises(GraceInputError, match="missing.png: no such image file"):
        random_retriever.retrieve(images=[picture(0), tmp_path / "missing.png"])
    for name in ("corrupt.png", "truncated.png"):
        with pytest.raises(GraceInputError, match=f"{name}: not a readable image"):
            random_retriever.retrieve(images=[tmp_path / name])
    with pytest.raises(GraceInputError, match=r"images\[1\]: expected a PIL image or an image file path, got int"):
        random_retriever.retrieve(images=[picture(0), 3])


def test_dense_reranking_of_an_image_query_uses_the_image_image_cosine(random_retriever):
    torch.manual_seed(0)
    encoder = DualEncoder.from_config("tiny")
    pictures = [picture(n) for n in range(len(COLLECTION))]
    scorer = DenseScorer(encoder, encoder.encode_pil_images(pictures), list(COLLECTION))
    reranker = Reranker(scorer, weight=0.0, num_beams=len(COLLECTION))  # the dense cosine alone
    retriever = random_retriever.for_candidates(None, reranker=reranker)
    for n in (0, 5):
        hits = retriever.retrieve(images=[pictures[n]], top_k=3)[0]
        assert hits[0].image_key == COLLECTION[n]  # the same picture: cosine 1
        assert hits[0].score == pytest.approx(scorer.logit_scale, rel=1e-4)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


# a model that memorized its images


def test_a_memorized_image_is_found_from_a_perturbed_copy(memorized):
    model_dir, pictures, _ = memorized
    retriever = GraceRetriever.from_pretrained(model_dir, device="cpu")
    rng = random.Random(0)
    copies = [perturbed(image, rng) for image in pictures.values()]
    top = [hits[0].image_key for hits in retriever.retrieve(images=copies, top_k=1)]
    assert top == list(pictures)


def test_cli_retrieve_by_image(memorized, tmp_path, capsys):
    model_dir, pictures, _ = memorized
    copy = tmp_path / "copy.jpg"
    perturbed(pictures[COLLECTION[3]], random.Random(1)).save(copy)
    argv = ["retrieve", "--model", str(model_dir), "--image", str(copy), "--top-k", "2"]
    assert cli.main([*argv, "--output-dir", str(tmp_path / "out"), "--num-threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"query: image: {copy}" in out and f"1. {COLLECTION[3]}" in out
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert record["image"] == str(copy) and record["results"][0]["image_key"] == COLLECTION[3]
    page = (tmp_path / "out" / "gallery.html").read_text()
    assert page.count("<figcaption>query</figcaption>") == 1 and page.count("data:image/png") == 1  # no image root
    assert cli.main([*argv, "--image-views", "2", "--num-threads", "1"]) == 0  # the copy and 2 crops of it
    assert f"1. {COLLECTION[3]}" in capsys.readouterr().out


def test_pipeline_takes_an_image_or_an_image_dict(memorized, tmp_path):
    from transformers import pipeline

    from grace_hf.serving.pipeline import TASK

    model_dir, pictures, _ = memorized
    retrieve = pipeline(TASK, model=str(model_dir), device="cpu")
    copy = perturbed(pictures[COLLECTION[5]], random.Random(2))
    copy.save(tmp_path / "copy.jpg")
    ranking = retrieve(copy, top_k=2)
    assert [r["image_key"] for r in ranking][0] == COLLECTION[5]
    assert retrieve({"image": str(tmp_path / "copy.jpg")}, top_k=2) == retrieve(Image.open(tmp_path / "copy.jpg"))[:2]
    mixed = retrieve(["a red square", copy, {"image": copy}], top_k=2, batch_size=2)
    assert mixed[1] == mixed[2] == ranking
    assert mixed[0] == retrieve("a red square", top_k=2)
    viewed = retrieve(["a red square", copy], top_k=2, image_views=2, batch_size=2)  # views: image queries only
    assert viewed[0] == mixed[0] and viewed[1] != ranking and viewed[1][0]["image_key"] == COLLECTION[5]
    expected = GraceRetriever.from_pretrained(model_dir, device="cpu").retrieve(images=[copy], top_k=2, image_views=2)
    assert [(r["image_key"], r["score"]) for r in viewed[1]] == [(h.image_key, h.score) for h in expected[0]]
    with pytest.raises(GraceInputError, match="nope.png: no such image file"):
        retrieve({"image": str(tmp_path / "nope.png")})
    with pytest.raises(GraceInputError, match="an image query is a PIL image or"):
        retrieve({"picture": copy})


def test_search_image_batch_answers_each_upload(memorized, tmp_path):
    pytest.importorskip("gradio")
    from grace_hf.serving.app import SearchService

    model_dir, pictures, _ = memorized
    retriever = GraceRetriever.from_pretrained(model_dir, device="cpu")
    service = SearchService(retriever)
    perturbed(pictures[COLLECTION[0]], random.Random(3)).save(tmp_path / "copy.jpg")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    good = {"path": str(tmp_path / "copy.jpg"), "orig_name": "holiday.jpg"}
    broken = {"path": str(tmp_path / "broken.png"), "orig_name": "broken.png"}
    galleries, statuses, answers = service.search_image_batch([good, None, broken, good], [3, 3, 3, 99])
    assert answers[0]["image"] == "holiday.jpg" and answers[0]["error"] is None
    assert [r["image_key"] for r in answers[0]["results"]][0] == COLLECTION[0] and len(answers[0]["results"]) == 3
    assert "no image" in answers[1]["error"] and "'broken.png' is not a readable image" in answers[2]["error"]
    assert "top-k must be a whole number" in answers[3]["error"]
    assert statuses[1].startswith("⚠️") and galleries[1] == []
    viewed = SearchService(retriever, image_views=2).search_image_batch([good], [3])[2][0]["results"]
    expected = retriever.retrieve(images=[tmp_path / "copy.jpg"], top_k=3, image_views=2)[0]
    assert [r["score"] for r in viewed] == pytest.approx([h.score for h in expected])
    assert [r["score"] for r in viewed] != pytest.approx([r["score"] for r in answers[0]["results"]])
    with pytest.raises(GraceInputError, match=r"image_views must be an integer in \[0, 32\]"):
        SearchService(retriever, image_views=-1)


def test_served_app_searches_by_uploaded_image_and_by_text(memorized, tmp_path):
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    model_dir, pictures, image_root = memorized
    retriever = GraceRetriever.from_pretrained(model_dir, device="cpu")
    copy = tmp_path / "copy.jpg"
    perturbed(pictures[COLLECTION[6]], random.Random(4)).save(copy)
    argv = ["--model", str(model_dir), "--image-root", str(image_root), "--num-threads", "1", "--image-views", "2"]
    with serve_subprocess(argv, env={"GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "OMP_NUM_THREADS": "1"}) as url:
        client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
        gallery, status, answer = client.predict(handle_file(str(copy)), 3, api_name="/search_image")
        expected = retriever.retrieve(images=[copy], top_k=3, image_views=2)[0]  # the server searches 2 crops too
        assert [h.score for h in expected] != [h.score for h in retriever.retrieve(images=[copy], top_k=3)[0]]
        assert [r["score"] for r in answer["results"]] == pytest.approx([h.score for h in expected])
        assert answer["error"] is None and answer["image"] == "copy.jpg"
        assert [r["image_key"] for r in answer["results"]] == [h.image_key for h in expected]
        assert expected[0].image_key == COLLECTION[6] and len(gallery) == 3
        _, _, text_answer = client.predict("a red square", 2, api_name="/search")
        assert [r["image_key"] for r in text_answer["results"]] == [
            h.image_key for h in retriever.retrieve(["a red square"], top_k=2)[0]
        ]


def test_benchmark_perturbs_with_a_fixed_seed_and_checks_its_arguments(tmp_path, capsys):
    from benchmarks import image_query

    original = Image.effect_noise((64, 48), 40).convert("RGB")
    first, again = (image_query.perturb(original, random.Random(0)) for _ in range(2))
    assert first.size == original.size and first.tobytes() == again.tobytes() != original.tobytes()
    with pytest.raises(SystemExit) as exit_:
        image_query.main(["--model", "m"])
    assert exit_.value.code == 2 and "--model, --dense and --data go together" in capsys.readouterr().err
    bad_flags = {"--crop-scale": ("0", "crop scale"), "--jpeg-quality": ("99", "JPEG quality")}
    bad_flags.update({"--original-share": ("2", "original share"), "--num-threads": ("0", "--num-threads must be")})
    for bad, (value, message) in bad_flags.items():
        with pytest.raises(SystemExit) as exit_:
            image_query.main(["--work-dir", str(tmp_path / "work"), bad, value])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything is trained or written
    flags = image_query.memorize_flags(0.7, 40, 0.25)
    assert flags[-6:] == ("--i2id-crop-scale", "0.7", "--i2id-jpeg-quality", "40", "--i2id-original-share", "0.25")
    result = {
        "queries": 4,
        "candidates": 4,
        "grace": {1: 0.5, 5: 1.0, "originals": 1.0, "seconds": 0.1},
        "dense": {1: 0.25, 5: 0.5, "originals": 1.0, "seconds": 0.1},
        "tokens": {1: 0.5, 5: 0.75, "originals": 1.0, "seconds": 0.1},
        "pixels": {1: 0.75, 5: 1.0, "originals": 1.0, "seconds": 0.0},
    }
    text = image_query.table(result)
    assert "| GRACE (`<image>` under the trie) | 50.0 | 100.0 | 2.00x | 100.0 | 0.1 |" in text
    assert "| nearest 3x3 RGB thumbnail | 75.0 | 100.0 | 3.00x | 100.0 | 0.0 |" in text


def test_benchmark_reference_rankings_find_copies_by_thumbnail_and_patch_tokens(random_retriever):
    from benchmarks import image_query

    pictures = [picture(n) for n in range(len(COLLECTION))]
    rng = random.Random(0)
    copies = [perturbed(image, rng) for image in pictures]
    by_thumbnail = image_query.thumbnail_rankings(pictures, copies, COLLECTION, 3)
    assert [ranking[0] for ranking in by_thumbnail] == COLLECTION and {len(r) for r in by_thumbnail} == {3}
    swapped = image_query.thumbnail_rankings(pictures[::-1], copies[:1], COLLECTION[::-1], 8)
    assert swapped[0][0] == COLLECTION[0] and sorted(swapped[0]) == sorted(COLLECTION)
    # the random tower's patch tokens find each exact picture first (cosine 1 with itself)
    by_tokens = image_query.patch_token_rankings(random_retriever, pictures, pictures, COLLECTION, 2)
    assert [ranking[0] for ranking in by_tokens] == COLLECTION and {len(r) for r in by_tokens} == {2}


def test_benchmark_refuses_a_missing_model_and_leaves_no_work_dir(tmp_path, capsys):
    from benchmarks import image_query

    missing = tmp_path / "no-model"
    argv = ["--work-dir", str(tmp_path / "work"), "--model", str(missing), "--dense", str(missing)]
    with pytest.raises(SystemExit) as exit_:
        image_query.main([*argv, "--data", str(missing)])
    assert exit_.value.code == 2 and str(missing) in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # neither the work directory nor its partial build is left


def test_benchmark_trains_the_tower_on_every_image_when_asked(tmp_path, monkeypatch, capsys):
    from benchmarks import image_query
    from grace_hf.errors import GraceInputError

    asked = []

    def stop_at_training(*args):
        asked.append(args[-1])  # every_image
        raise GraceInputError("stopped before training")

    monkeypatch.setattr(image_query, "train", stop_at_training)
    for flags in ([], ["--every-image"]):
        with pytest.raises(SystemExit) as exit_:
            image_query.main(["--work-dir", str(tmp_path / "work"), *flags])
        assert exit_.value.code == 2 and "stopped before training" in capsys.readouterr().err
    assert asked == [False, True] and not (tmp_path / "work").exists()

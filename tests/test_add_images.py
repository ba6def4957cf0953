"""add-images: new identifiers per kind, the grown vocabulary, the replayed batches, the new model directory (the old
one untouched), the structured tree's descent, and the errors that stop it before anything is written."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from benchmarks.synthetic_split import write_part
from grace_hf.commands import add_images as add_images_command
from grace_hf.data.karpathy import load_karpathy
from grace_hf.data.prepared import load_prepared
from grace_hf.data.pseudo_queries import load_pseudo_queries
from grace_hf.data.synthetic import ORACLE_PSEUDO_QUERIES_JSON, SYNTHETIC_JSON
from grace_hf.dense.directory import FEATURES_FILE, save_image_features
from grace_hf.errors import GraceInputError
from grace_hf.identifiers import (
    CODEBOOKS_FILE,
    IDENTIFIER_KINDS,
    Codebooks,
    IdentifierIndex,
    build_identifiers,
    extend_identifiers,
)
from grace_hf.identifiers.embeddings import EmbeddingOptions, embed
from grace_hf.identifiers.semantic import normalize
from grace_hf.identifiers.structured import KMeansTree, StructuredOptions, identifier_to_path, path_to_identifier
from grace_hf.model_dir import read_model_dir
from grace_hf.models.flamingo import FlamingoProcessor
from grace_hf.retrieval import GraceRetriever, IdentifierTrie
from grace_hf.retrieval.collection import identifier_token_ids
from grace_hf.training.adding import added_training_data, default_replay_ratio, split_batch
from grace_hf.training.args import ADD_IMAGES_ARGUMENT_CLASSES, parse_args
from grace_hf.training.modeling import build_model_and_processor
from grace_hf.training.sampling import ConcatBatchSampler, StepBatchSampler
from tests.helpers import (
    NUM_IMAGES,
    NUM_OLD,
    add_argv,
    reset_accelerate,
    train_old,
    write_collections,
)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def run_add(argv) -> None:
    try:
        assert add_images_command.main(argv) == 0
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def collections(tmp_path_factory):
    """One synthetic set cut in two: `old` (the first 22 images) and `new` (the last 8), one image root `raw`."""
    return write_collections(tmp_path_factory.mktemp("collections"))


@pytest.fixture(scope="module", params=IDENTIFIER_KINDS)
def added(request, collections, tmp_path_factory):
    """Per kind: a model trained on `old`, its files' digests, and the model directory after adding `new`."""
    old, new = collections
    root = tmp_path_factory.mktemp(f"add-{request.param}")
    prepared, model = train_old(root, old, request.param)
    before = _tree_digest(model)
    run_add(add_argv(model, new, root / "added"))
    return {"kind": request.param, "prepared": prepared, "model": model, "before": before, "out": root / "added"}


def test_new_directory_is_a_complete_retriever_and_the_old_one_is_untouched(added, collections):
    old, new = collections
    kind, model, out = added["kind"], added["model"], added["out"]
    assert _tree_digest(model) == added["before"]

    old_index, index = IdentifierIndex.load(model), IdentifierIndex.load(out)
    new_images = load_karpathy(new / SYNTHETIC_JSON, new.parent / "raw", check_images=False).memorized()
    assert list(index.images) == [*old_index.images, *(image.key for image in new_images)]
    assert {key: index.images[key] for key in old_index.images} == old_index.images  # nobody renamed
    identifiers = [identifier for ids in index.images.values() for identifier in ids]
    assert len(identifiers) == len(set(identifiers))
    new_test = [image.key for image in new_images if image.split == "test"]
    assert new_test and index.collection == old_index.collection + new_test
    assert json.loads((out / "grace_config.json").read_text()) == {
        "query_image": "none",
        "identifier_kind": kind,
        "num_identifiers": len(identifiers),
    }
    record = json.loads((out / "training_args.json").read_text())
    assert record["data"] == [str(added["prepared"].resolve()), "./added_images"]
    assert record["command"].startswith("grace-hf add-images --model")

    # the tokenizer grew by the new identifier tokens, keeping every old id; the embeddings grew with it
    old_processor, processor = FlamingoProcessor.from_pretrained(model), FlamingoProcessor.from_pretrained(out)
    old_vocab, vocab = old_processor.tokenizer.get_vocab(), processor.tokenizer.get_vocab()
    assert all(vocab[token] == token_id for token, token_id in old_vocab.items())
    grown = sorted(set(vocab) - set(old_vocab), key=vocab.get)
    assert grown == [token for token in index.new_tokens if token not in old_vocab]
    assert (kind in ("atomic", "structured", "rq")) == bool(grown)
    embeddings = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    assert embeddings.shape[0] == len(processor.tokenizer) == read_model_dir(out).model.config.text_config.vocab_size
    assert [vocab[token] for token in grown] == list(range(len(old_vocab), len(vocab)))

    # the trie answers for old and new images: every identifier spells itself, and exhaustive beams reach all
    retriever = GraceRetriever.from_pretrained(out)
    assert retriever.candidates == index.collection
    sequences = identifier_token_ids(processor, retriever.identifiers)
    saved = IdentifierTrie.load(out / "identifier_trie.safetensors")
    width = max(map(len, sequences))
    padded = torch.tensor([s + [processor.pad_token_id] * (width - len(s)) for s in sequences])
    assert saved.lookup(padded, processor.end_of_chunk_token_id).tolist() == list(range(len(sequences)))
    retriever.num_beams = len(retriever.identifiers)
    hits = retriever.retrieve(["a red circle"], top_k=len(retriever.candidates))[0]
    assert {hit.image_key for hit in hits} == set(index.collection)

    # the new rows stay with the model (for the next add) and evaluate the new images over the whole collection
    rows = load_prepared(out / "added_images")
    assert set(rows["i2id"]["image_key"]) == {image.key for image in new_images}
    assert IdentifierIndex.load(out / "added_images") == index


@pytest.mark.parametrize("added", ["structured"], indirect=True)
def test_structured_codebooks_follow_the_model(added):
    prepared_books = Codebooks.load(added["prepared"] / CODEBOOKS_FILE)
    copied = Codebooks.load(added["model"] / CODEBOOKS_FILE)  # training copied them into the model directory
    assert copied.metadata == prepared_books.metadata and copied.tensors.keys() == prepared_books.tensors.keys()
    assert all(np.array_equal(copied.tensors[name], prepared_books.tensors[name]) for name in copied.tensors)
    grown = Codebooks.load(added["out"] / CODEBOOKS_FILE)
    leaves = {tuple(leaf): size for leaf, size in grown.metadata["leaves"]}
    assert sum(leaves.values()) == NUM_IMAGES  # every image, old and new, has its place in the saved tree
    assert np.array_equal(grown.tensors["pixel_mean"], prepared_books.tensors["pixel_mean"])
    kept = prepared_books.tensors["centroids"]
    old_rows = {tuple(path): row for path, row in zip(grown.metadata["child_paths"], grown.tensors["centroids"])}
    for path, centroid in zip(prepared_books.metadata["child_paths"], kept):
        assert np.array_equal(old_rows[tuple(path)], centroid)  # the old centroids do not move


@pytest.mark.parametrize("added", ["rq"], indirect=True)
def test_rq_codebooks_follow_the_model_unchanged(added):
    prepared_books = Codebooks.load(added["prepared"] / CODEBOOKS_FILE)
    for directory in (added["model"], added["out"]):  # copied by training, kept by add-images: codes never move
        books = Codebooks.load(directory / CODEBOOKS_FILE)
        assert books.kind == "rq" and books.metadata == prepared_books.metadata
        assert books.tensors.keys() == {"centroids", "mean", "pixel_mean"}
        assert all(np.array_equal(books.tensors[name], prepared_books.tensors[name]) for name in books.tensors)
    old, new = IdentifierIndex.load(added["model"]), IdentifierIndex.load(added["out"])
    added_ids = [new.images[key][0] for key in new.images if key not in old.images]
    top = max(int(identifier.split("-")[1].split("_")[1]) for ids in old.images.values() for identifier in ids)
    assert sorted(int(identifier.split("-")[1].split("_")[1]) for identifier in added_ids)[-1] > top


@pytest.mark.parametrize("added", ["atomic"], indirect=True)
def test_atomic_tokens_start_from_their_captions(added, tmp_path, collections):
    _, new = collections
    model = added["model"]
    model_args, data_args, args = parse_args(
        add_argv(model, new, tmp_path / "added"), ADD_IMAGES_ARGUMENT_CLASSES, "grace-hf add-images"
    )
    data = added_training_data(model_args, data_args, args, str(tmp_path / "cache"))
    assert len(data.token_texts) == NUM_IMAGES - NUM_OLD
    # batches mirror the collection: 22 old images per 8 new ones (i2id batch 4 = 1 + 3, t2id batch 8 = 2 + 6)
    assert [(s.name, s.batch_size, s.replay_batch_size) for s in data.streams] == [("i2id", 1, 3), ("t2id", 2, 6)]
    grown, processor = build_model_and_processor(model_args, [], data.index.new_tokens, data.token_texts)
    before = load_file(model / "model.safetensors")["model.embed_tokens.weight"]
    table = grown.get_input_embeddings().weight.detach()
    assert torch.equal(table[: len(before)], before)
    for token, texts in data.token_texts.items():
        ids = [i for text in texts for i in processor.tokenizer(text, add_special_tokens=False)["input_ids"]]
        torch.testing.assert_close(table[processor.tokenizer.convert_tokens_to_ids(token)], before[ids].mean(0))
    # the same model without the texts: the new rows are the resize's draw, not the captions' mean
    reset, _ = build_model_and_processor(model_args, [], data.index.new_tokens)
    row = processor.tokenizer.convert_tokens_to_ids(next(iter(data.token_texts)))
    assert not torch.allclose(reset.get_input_embeddings().weight[row], table[row])
    assert not (tmp_path / "added").exists()


@pytest.mark.parametrize("added", ["rq"], indirect=True)
def test_rq_and_structured_replay_half_the_collections_proportion_unless_told(added, tmp_path, collections):
    _, new = collections
    argv = add_argv(added["model"], new, tmp_path / "added")

    def streams(*flags: str) -> list[tuple[str, int, int]]:
        model_args, data_args, args = parse_args([*argv, *flags], ADD_IMAGES_ARGUMENT_CLASSES, "grace-hf add-images")
        data = added_training_data(model_args, data_args, args, str(tmp_path / "cache"))
        return [(s.name, s.batch_size, s.replay_batch_size) for s in data.streams]

    # 22 old images per 8 new ones, halved: 1.375 old rows per new row (i2id batch 4 = 2 + 2, t2id 8 = 3 + 5)
    assert default_replay_ratio("rq", 22, 8) == default_replay_ratio("structured", 22, 8) == 1.375
    assert default_replay_ratio("numeric", 22, 8) == default_replay_ratio("atomic", 22, 8) == 2.75
    assert streams() == [("i2id", 2, 2), ("t2id", 3, 5)]
    assert streams("--replay-ratio", "2.75") == [("i2id", 1, 3), ("t2id", 2, 6)]  # the proportion, when asked
    assert not (tmp_path / "added").exists()
    # the model that was added with the default records the rows its batches held
    record = json.loads((added["out"] / "added_images" / "prepare.json").read_text())
    assert record["batch_rows"] == {"i2id": {"new": 2, "replayed": 2}, "t2id": {"new": 3, "replayed": 5}}


@pytest.mark.parametrize("added", ["structured"], indirect=True)
def test_evaluate_takes_the_new_directory_as_it_is(added, tmp_path):
    from grace_hf.commands import cli

    out = added["out"]
    assert (
        cli.main(
            ["evaluate", "--model", str(out), "--data", str(out / "added_images"), "--output-dir", str(tmp_path / "e")]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["num_candidates"] == len(IdentifierIndex.load(out).collection)
    assert metrics["num_queries"] == load_prepared(out / "added_images")["queries"].num_rows > 0


@pytest.mark.parametrize("added", ["numeric"], indirect=True)
def test_adding_twice_replays_every_earlier_dataset(added, collections, tmp_path):
    old, new = collections
    raw = new.parent / "raw"  # the parts sit beside the image root, as add_argv expects
    first = write_part(raw, new.parent / "chain-first", NUM_OLD, NUM_OLD + 4)
    second = write_part(raw, new.parent / "chain-second", NUM_OLD + 4)
    run_add(add_argv(added["model"], first, tmp_path / "once"))
    run_add(add_argv(tmp_path / "once", second, tmp_path / "twice"))
    record = json.loads((tmp_path / "twice" / "training_args.json").read_text())
    assert record["data"] == [
        str(added["prepared"].resolve()),
        str(tmp_path / "once" / "added_images"),
        "./added_images",
    ]
    index = IdentifierIndex.load(tmp_path / "twice")
    assert list(index.images) == list(IdentifierIndex.load(added["out"]).images)  # the same images, one add or two
    assert index.images["images/synthetic_000029.png"] == ["2 9"]


# SIGKILLs add-images right after optimizer step KILL_AT
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import grace_hf.training.loop as train

    step = train._Trainer._step

    def step_then_die(self, *args):
        result = step(self, *args)
        if self.step == int(os.environ["KILL_AT"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    train._Trainer._step = step_then_die
    from grace_hf.commands import add_images
    sys.exit(add_images.main(sys.argv[1:]))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("added", ["structured"], indirect=True)
def test_killed_add_resumes_to_the_same_weights(added, collections, tmp_path):
    _, new = collections
    steps = ["--max-steps", "4", "--save-steps", "2"]
    run_add(add_argv(added["model"], new, tmp_path / "reference", *steps))
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    argv = add_argv(added["model"], new, tmp_path / "out", *steps)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KILL_AT": "3"}
    process = subprocess.run(
        [sys.executable, str(script), *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert process.returncode == -signal.SIGKILL, process.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # the output appears only when complete
    with pytest.raises(GraceInputError, match="unfinished run left checkpoints in .*; resume it"):
        run_add(argv)

    run_add([*argv, "--resume-from-checkpoint", "latest"])
    resumed, reference = (
        load_file(tmp_path / "out" / "model.safetensors"),
        load_file(tmp_path / "reference" / "model.safetensors"),
    )
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[name], reference[name]) for name in reference)
    assert IdentifierIndex.load(tmp_path / "out") == IdentifierIndex.load(tmp_path / "reference")
    assert load_prepared(tmp_path / "out" / "added_images")["i2id"].num_rows == NUM_IMAGES - NUM_OLD
    assert _tree_digest(added["model"]) == added["before"]


def test_every_batch_mixes_new_and_replayed_rows():
    assert split_batch(16, 1.0) == (8, 8) and split_batch(48, 2.0) == (16, 32) and split_batch(16, 0.0) == (16, 0)
    new = StepBatchSampler(5, 2, seed=0)
    replay = StepBatchSampler(20, 3, seed=1)
    sampler = iter(ConcatBatchSampler([new, replay], [0, 5]))
    batches = [next(sampler) for _ in range(10)]
    assert all(
        len(batch) == 5 and all(i < 5 for i, _ in batch[:2]) and all(i >= 5 for i, _ in batch[2:]) for batch in batches
    )
    replayed = [index - 5 for batch in batches for index, epoch in batch[2:] if epoch == 0]
    assert sorted(replayed) == list(range(20))  # the replay walks through every old row, not a fixed sample
    resumed = iter(
        ConcatBatchSampler([StepBatchSampler(5, 2, 0, start_step=4), StepBatchSampler(20, 3, 1, start_step=4)], [0, 5])
    )
    assert [next(resumed) for _ in range(6)] == batches[4:]


# the structured tree


def test_new_images_descend_the_tree_into_free_places_then_new_leaves(tmp_path):
    features = np.array([[0, 0], [0, 0.1], [0, 0.2], [10, 0], [10, 0.1], [10, 0.2]], dtype=np.float32)
    paths = [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    tree = KMeansTree.from_paths(paths, features, leaf_size=4)
    assert tree.leaves == {(0,): 3, (1,): 3}
    np.testing.assert_allclose(tree.children[()][1], [10, 0.1])
    assert tree.code(np.array([9.0, 0.0])) == [1, 3]  # the last free place of the nearest leaf
    assert tree.code(np.array([11.0, 0.0])) == [2, 0]  # that leaf is full: a new leaf beside it
    assert tree.code(np.array([11.0, 0.1])) == [2, 1]  # which the next close image joins
    assert tree.code(np.array([0.0, 0.0])) == [0, 3]
    root_leaf = KMeansTree.from_paths([[0], [1]], features[:2], leaf_size=2)
    assert root_leaf.code(features[0]) == [2]  # a root leaf has no parent: it grows
    options = StructuredOptions(pixel_features=True, k=2, leaf_size=4)
    saved = Codebooks.load(root_leaf.to_codebooks(options, {}).save(tmp_path / "root.safetensors"))
    assert saved.tensors["centroids"].shape == (0, 2)
    assert KMeansTree.from_codebooks(saved, "books").code(features[0]) == [3]
    saved = Codebooks.load(tree.to_codebooks(options, {}).save(tmp_path / CODEBOOKS_FILE))
    again = KMeansTree.from_codebooks(saved, "books")
    assert again.leaves == tree.leaves and set(again.children[()]) == {0, 1, 2}
    assert identifier_to_path(path_to_identifier([12, 5, 3])) == [12, 5, 3] and identifier_to_path("1 2") is None


def _corpus(collection: Path):
    return load_karpathy(collection / SYNTHETIC_JSON, collection.parent / "raw", check_images=False)


@pytest.fixture(scope="module")
def structured_old(collections):
    """Structured identifiers of the old collection (pixel features), with their codebooks."""
    old, _ = collections
    return build_identifiers("structured", _corpus(old), pixel_features=True, k=3, leaf_size=4)


def test_extending_recomputes_pixel_features_in_the_saved_space(structured_old, collections):
    old, new = collections
    everything = _corpus(old).memorized() + _corpus(new).memorized()
    reference = embed(EmbeddingOptions(pixel_features=True), _corpus(old).memorized())
    together = embed(EmbeddingOptions(pixel_features=True), everything, saved=reference.tensors)
    np.testing.assert_allclose(together.features[:NUM_OLD], reference.features, atol=1e-6)
    extended = extend_identifiers(structured_old, _corpus(new), codebooks=structured_old.codebooks)
    tree = KMeansTree.from_codebooks(structured_old.codebooks, "books")
    expected = [path_to_identifier(tree.code(x)) for x in together.features[NUM_OLD:]]
    assert [extended.images[image.key][0] for image in _corpus(new).memorized()] == expected


def test_features_file_must_hold_the_new_images_unless_a_dense_encoder_sits_beside_it(collections, tmp_path):
    from grace_hf.dense import DualEncoder

    old, new = collections
    old_images, new_images = _corpus(old).memorized(), _corpus(new).memorized()
    torch.manual_seed(0)
    encoder = DualEncoder.from_config("tiny")
    dense = tmp_path / "dense"
    dense.mkdir()
    encoder.save(dense)
    save_image_features(
        dense / FEATURES_FILE, encoder.encode_images([i.path for i in old_images]), [i.key for i in old_images]
    )
    index = build_identifiers("structured", _corpus(old), image_features=str(dense / FEATURES_FILE), k=3, leaf_size=4)
    extended = extend_identifiers(index, _corpus(new), codebooks=index.codebooks)  # the encoder embeds the new images
    wanted = encoder.encode_images([image.path for image in new_images]).numpy()
    got = embed(EmbeddingOptions(image_features=str(dense)), new_images).features
    np.testing.assert_allclose(got, wanted, atol=1e-5)
    assert len(extended.images) == NUM_IMAGES

    lone = tmp_path / "lone.safetensors"
    (dense / FEATURES_FILE).rename(lone)
    with pytest.raises(
        GraceInputError, match=r"lone.safetensors: no features for image 'images/synthetic_000022.png' \(8"
    ):
        extend_identifiers(index, _corpus(new), codebooks=index.codebooks, image_features=str(lone))


def test_extension_errors_name_the_item(structured_old, collections):
    old, new = collections
    books = structured_old.codebooks
    with pytest.raises(GraceInputError, match=r"image 'images/synthetic_000000.png' is already in model \(22 of"):
        extend_identifiers(structured_old, _corpus(old), codebooks=books, source="model")
    with pytest.raises(GraceInputError, match=r"model: no identifier_codebooks.safetensors: structured identifiers"):
        extend_identifiers(structured_old, _corpus(new), source="model")
    numeric = build_identifiers("numeric", _corpus(old))
    with pytest.raises(GraceInputError, match="structured codebooks for numeric identifiers"):
        extend_identifiers(numeric, _corpus(new), codebooks=books)
    with pytest.raises(GraceInputError, match="numeric identifiers do not take --image-features"):
        extend_identifiers(numeric, _corpus(new), image_features="f.safetensors")
    with pytest.raises(GraceInputError, match=r"--leaf-size is fixed by the saved tree \(4\)"):
        extend_identifiers(structured_old, _corpus(new), codebooks=books, leaf_size=9)
    renamed = IdentifierIndex("structured", {**structured_old.images, "images/synthetic_000000.png": ["0_9-1_9"]})
    with pytest.raises(GraceInputError, match=r"no place for identifier '0_9-1_9'.*belong to another collection"):
        extend_identifiers(renamed, _corpus(new), codebooks=books)


def test_numbers_continue_and_semantic_texts_never_collide(collections):
    old, new = collections
    for kind, last in (("numeric", "2 9"), ("string", "29"), ("atomic", "<img_29>")):
        extended = extend_identifiers(build_identifiers(kind, _corpus(old)), _corpus(new))
        assert extended.images["images/synthetic_000029.png"] == [last]
    atomic = extend_identifiers(build_identifiers("atomic", _corpus(old)), _corpus(new))
    assert atomic.new_tokens == [f"<img_{n}>" for n in range(NUM_IMAGES)]

    train = next(image for image in _corpus(new).memorized() if image.split == "train")
    taken = normalize(train.captions[0])
    semantic = IdentifierIndex("semantic", {"images/old.png": [taken, "another text"]})
    queries = load_pseudo_queries(new / ORACLE_PSEUDO_QUERIES_JSON, _corpus(new))
    extended = extend_identifiers(semantic, _corpus(new), pseudo_queries=queries)
    assert extended.images["images/old.png"] == [taken, "another text"]
    assert extended.images[train.key] == [normalize(c) for c in train.captions[1:]]
    assert extended.report["collisions_dropped"] == 1
    everything_taken = IdentifierIndex("semantic", {"images/old.png": [normalize(c) for c in train.captions]})
    with pytest.raises(GraceInputError, match=f"every text of image '{train.key}' also names an earlier image"):
        extend_identifiers(everything_taken, _corpus(new), pseudo_queries=queries)


def test_add_images_benchmark_with_a_captioner_never_hands_the_oracle_texts_to_the_model(tmp_path):
    """`benchmarks/add_images.py --texts captioner` (its default): A's texts are the captioner's file, the content
    identifiers come from the tower's embeddings, and A+B has no texts until the captioner wrote B's."""
    from benchmarks.add_images import Texts

    written = tmp_path / "pseudo-queries" / "pseudo_queries.json"
    features = tmp_path / "tower_features.safetensors"
    texts = Texts(tmp_path / "captioner", tmp_path / "dense-a", features, {"a": written})
    assert texts.of(tmp_path / "a") == written
    with pytest.raises(KeyError):
        texts.of(tmp_path / "ab")
    assert texts.prepare_options("rq") == {"image_features": str(features)}
    assert "pixel_features" not in texts.prepare_options("structured")
    assert "image_features" not in texts.prepare_options("numeric")
    oracle = Texts()
    assert oracle.of(tmp_path / "a") == tmp_path / "a" / ORACLE_PSEUDO_QUERIES_JSON
    assert oracle.prepare_options("rq")["pixel_features"] is True

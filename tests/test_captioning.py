"""The pseudo-query captioner: trained by the same loop (`task: captioner`), then `grace-hf pseudo-queries`."""

import json
from types import SimpleNamespace

import pytest
import torch

from grace_hf.commands import pseudo_queries as pseudo_queries_command
from grace_hf.data import captioning
from grace_hf.data.karpathy import load_karpathy
from grace_hf.data.pseudo_queries import load_pseudo_queries
from grace_hf.dense.model import DualEncoder, load_dual_encoder
from grace_hf.dense.query_filter import PROPOSED_SAMPLES, DenseQueryFilter
from grace_hf.errors import GraceInputError
from grace_hf.training.adding import new_pseudo_queries
from grace_hf.training.args import AddImagesArguments
from tests.helpers import MICRO, run_training, write_recipe


@pytest.fixture(scope="module")
def trained_captioner(tmp_path_factory, synthetic):
    root = tmp_path_factory.mktemp("captioner")
    raw = synthetic(24, seed=1)
    recipe = {
        "task": "captioner",
        "karpathy_json": str(raw / "dataset_synthetic.json"),
        "image_root": str(raw),
        "model_preset": "tiny",
        "tokenizer_vocab_size": 300,
        "output_dir": str(root / "captioner"),
        "max_steps": 8,
        "batch_size_caption": 8,
        "learning_rate": 3e-3,
        "warmup_steps": 1,
        "save_steps": 0,
        "report_to": "none",
    }
    run_training(["--config", write_recipe(root / "captioner.yaml", recipe)])
    return raw, root / "captioner"


def test_captioner_directory_has_no_retrieval_files(trained_captioner):
    _, model_dir = trained_captioner
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()
    assert not (model_dir / "identifiers.json").exists() and not (model_dir / "grace_config.json").exists()
    assert "captioner" in (model_dir / "README.md").read_text()
    assert json.loads((model_dir / "metrics.json").read_text())["train_loss_caption"] > 0


def test_pseudo_queries_for_every_val_and_test_image(trained_captioner, tmp_path):
    raw, model_dir = trained_captioner
    output = tmp_path / "pseudo"
    argv = ["--model", str(model_dir), "--karpathy-json", str(raw / "dataset_synthetic.json")]
    argv += ["--image-root", str(raw), "--output-dir", str(output), "--max-new-tokens", "8", "--batch-size", "4"]
    assert pseudo_queries_command.main(argv) == 0
    corpus = load_karpathy(raw / "dataset_synthetic.json", raw)
    queries = load_pseudo_queries(output, corpus)  # the format `prepare` reads
    expected = [image.key for image in corpus.images if image.split in ("val", "test")]
    assert list(queries) == expected
    assert all(len(texts) <= 5 and len(set(texts)) == len(texts) for texts in queries.values())
    assert any(queries.values())
    raw_file = json.loads((output / "pseudo_queries.json").read_text())
    assert set(raw_file) == {key.rsplit("/", 1)[-1] for key in expected}  # keyed by file name, as the original
    quality = json.loads((output / "quality.json").read_text())  # BLEU-4 against the held-out val captions
    assert quality["split"] == "val" and 0.0 <= quality["bleu4"] <= 100.0


def test_sampled_queries_follow_the_beams_and_repeat_for_a_seed(trained_captioner, tmp_path):
    """--num-sampled draws more queries after the beams by top-k sampling: seeded (the same file twice, another
    seed another file), and the global random state is left as it was."""
    raw, model_dir = trained_captioner
    argv = ["--model", str(model_dir), "--karpathy-json", str(raw / "dataset_synthetic.json")]
    argv += ["--image-root", str(raw), "--max-new-tokens", "8", "--batch-size", "4"]
    written, states = {}, {}
    for name, flags in {
        "beams": [],
        "sampled": ["--num-sampled", "6", "--top-k", "50"],
        "again": ["--num-sampled", "6", "--top-k", "50"],
        "seed": ["--num-sampled", "6", "--top-k", "50", "--seed", "1"],
    }.items():
        torch.manual_seed(0)
        assert pseudo_queries_command.main([*argv, *flags, "--output-dir", str(tmp_path / name)]) == 0
        written[name] = json.loads((tmp_path / name / "pseudo_queries.json").read_text())
        states[name] = torch.random.get_rng_state()
    assert torch.equal(states["sampled"], states["beams"])  # sampling drew from its own seeded state
    assert written["sampled"] == written["again"] and written["sampled"] != written["seed"]
    for bad in (["--num-sampled", "-1"], ["--num-sampled", "101"], ["--num-sampled", "2", "--top-k", "0"]):
        with pytest.raises(SystemExit) as exit_:
            pseudo_queries_command.main([*argv, *bad, "--output-dir", str(tmp_path / "bad")])
        assert exit_.value.code == 2 and not (tmp_path / "bad").exists()
    for image, beams in written["beams"].items():
        sampled = written["sampled"][image]
        assert sampled[: len(beams)] == beams and len(beams) < len(sampled) <= len(beams) + 6
        assert len(set(sampled)) == len(sampled)


def test_more_queries_than_beams_is_refused(trained_captioner, tmp_path):
    raw, model_dir = trained_captioner
    argv = ["--model", str(model_dir), "--karpathy-json", str(raw / "dataset_synthetic.json")]
    argv += ["--image-root", str(raw), "--output-dir", str(tmp_path / "p"), "--num-queries", "6"]
    with pytest.raises(GraceInputError, match="cannot exceed --num-beams"):
        pseudo_queries_command.main(argv)


def test_add_images_has_its_captioner_write_the_new_images_queries(trained_captioner):
    """New images with no text at all: the captioner writes their val/test queries from their pixels."""
    raw, model_dir = trained_captioner
    corpus = load_karpathy(raw / "dataset_synthetic.json", raw)
    arguments = SimpleNamespace(pseudo_queries=None, captioner=str(model_dir), captioner_filter=None)
    queries = new_pseudo_queries(arguments, corpus)
    assert sorted(queries) == sorted(image.key for image in corpus.images if image.split in ("val", "test"))
    none = SimpleNamespace(pseudo_queries=None, captioner=None, captioner_filter=None)
    assert new_pseudo_queries(none, corpus) == {}
    with pytest.raises(GraceInputError, match="not both"):
        AddImagesArguments(karpathy_json="a.json", image_root="r", pseudo_queries="p.json", captioner=str(model_dir))


def test_add_images_captioner_filter_keeps_the_closest_of_more_queries(trained_captioner, dense_dir, monkeypatch):
    """With `captioner_filter`, add-images writes the new images' queries as the demo does: beams and samples
    proposed, the dense model's closest five kept."""
    raw, model_dir = trained_captioner
    corpus = load_karpathy(raw / "dataset_synthetic.json", raw)
    proposed = {}
    generate = captioning.generate_pseudo_queries

    def recorded(*args, **kwargs):
        proposed.update(kwargs)
        return generate(*args, **kwargs)

    monkeypatch.setattr(captioning, "generate_pseudo_queries", recorded)
    arguments = SimpleNamespace(pseudo_queries=None, captioner=str(model_dir), captioner_filter=str(dense_dir))
    queries = new_pseudo_queries(arguments, corpus)
    assert proposed["num_sampled"] == PROPOSED_SAMPLES and isinstance(proposed["query_filter"], DenseQueryFilter)
    assert sorted(queries) == sorted(image.key for image in corpus.images if image.split in ("val", "test"))
    assert all(1 <= len(texts) <= 5 for texts in queries.values())


def test_add_images_refuses_a_captioner_filter_without_a_captioner():
    with pytest.raises(GraceInputError, match="captioner_filter keeps some of a captioner's queries"):
        AddImagesArguments(karpathy_json="a.json", image_root="r", captioner_filter="dense")


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A dual encoder directory (random MICRO weights): what `--filter` reads of a `baseline-clip` output."""
    directory = tmp_path_factory.mktemp("dense")
    torch.manual_seed(0)
    DualEncoder.from_config(MICRO).save(directory)
    return directory


def test_the_filter_keeps_each_images_queries_closest_to_it_under_the_dense_model(trained_captioner, dense_dir):
    raw, _ = trained_captioner
    corpus = load_karpathy(raw / "dataset_synthetic.json", raw)
    images = corpus.split("test")[:3]
    texts = ["a red circle", "a blue square on white", "a big green star", "a small dot", "a red circle"[::-1]]
    queries = {image.key: list(texts) for image in images}
    query_filter = DenseQueryFilter.from_directory(dense_dir, keep=2)
    kept = query_filter(images, queries)
    encoder = load_dual_encoder(dense_dir)
    for image in images:
        cosines = (encoder.encode_texts(texts) @ encoder.encode_images([image.path])[0]).tolist()
        best = sorted(texts, key=lambda text: -cosines[texts.index(text)])[:2]
        assert kept[image.key] == best
    assert query_filter(images[:1], {images[0].key: []}) == {images[0].key: []}
    with pytest.raises(GraceInputError, match="whole number >= 1"):
        DenseQueryFilter(encoder, keep=0)


def test_pseudo_queries_filter_keeps_the_closest_of_the_beams_and_samples(trained_captioner, dense_dir, tmp_path):
    raw, model_dir = trained_captioner
    argv = ["--model", str(model_dir), "--karpathy-json", str(raw / "dataset_synthetic.json")]
    argv += ["--image-root", str(raw), "--max-new-tokens", "8", "--batch-size", "4", "--num-sampled", "6"]
    argv += ["--top-k", "50"]
    assert pseudo_queries_command.main([*argv, "--output-dir", str(tmp_path / "all")]) == 0
    filtered = [*argv, "--filter", str(dense_dir), "--keep", "2", "--output-dir", str(tmp_path / "kept")]
    assert pseudo_queries_command.main(filtered) == 0
    written = json.loads((tmp_path / "all" / "pseudo_queries.json").read_text())
    kept = json.loads((tmp_path / "kept" / "pseudo_queries.json").read_text())
    assert kept.keys() == written.keys()
    assert all(len(kept[name]) == min(2, len(texts)) for name, texts in written.items())
    assert all(set(kept[name]) <= set(texts) for name, texts in written.items())
    assert any(kept[name] != texts[:2] for name, texts in written.items())  # not simply the first beams


def test_pseudo_queries_names_a_filter_directory_that_is_not_a_dense_model(trained_captioner, tmp_path, capsys):
    raw, model_dir = trained_captioner
    argv = ["--model", str(model_dir), "--karpathy-json", str(raw / "dataset_synthetic.json")]
    argv += ["--image-root", str(raw), "--output-dir", str(tmp_path / "p"), "--filter", str(model_dir)]
    with pytest.raises(GraceInputError, match=f"{model_dir}: not a dual encoder directory"):
        pseudo_queries_command.main(argv)
    assert not (tmp_path / "p").exists()


def test_pseudo_queries_samples_more_for_the_filter_by_default(trained_captioner, dense_dir, tmp_path, monkeypatch):
    raw, model_dir = trained_captioner
    asked = []
    monkeypatch.setattr(pseudo_queries_command, "caption_splits", lambda *args, **options: asked.append(options) or {})
    argv = [
        "--model",
        str(model_dir),
        "--karpathy-json",
        str(raw / "dataset_synthetic.json"),
        "--image-root",
        str(raw),
    ]
    assert pseudo_queries_command.main([*argv, "--output-dir", str(tmp_path / "plain")]) == 0
    assert (
        pseudo_queries_command.main([*argv, "--output-dir", str(tmp_path / "kept"), "--filter", str(dense_dir)]) == 0
    )
    assert asked[0]["num_sampled"] == 0 and asked[0]["query_filter"] is None
    assert asked[1]["num_sampled"] == PROPOSED_SAMPLES and asked[1]["query_filter"].keep == 5

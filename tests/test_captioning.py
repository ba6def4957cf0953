"""The pseudo-query captioner: trained by the same loop (`task: captioner`), then `grace-hf pseudo-queries`."""

import json
from types import SimpleNamespace

import pytest
import torch

from grace_hf.commands import pseudo_queries as pseudo_queries_command
from grace_hf.data.karpathy import load_karpathy
from grace_hf.data.pseudo_queries import load_pseudo_queries
from grace_hf.errors import GraceInputError
from grace_hf.training.adding import new_pseudo_queries
from grace_hf.training.args import AddImagesArguments
from tests.helpers import run_training, write_recipe


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
    arguments = SimpleNamespace(pseudo_queries=None, captioner=str(model_dir))
    queries = new_pseudo_queries(arguments, corpus)
    assert sorted(queries) == sorted(image.key for image in corpus.images if image.split in ("val", "test"))
    assert new_pseudo_queries(SimpleNamespace(pseudo_queries=None, captioner=None), corpus) == {}
    with pytest.raises(GraceInputError, match="not both"):
        AddImagesArguments(karpathy_json="a.json", image_root="r", pseudo_queries="p.json", captioner=str(model_dir))

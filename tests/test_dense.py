"""The dense baseline: a tiny open_clip dual encoder trained and evaluated on 40 synthetic images."""

import json

import pytest
import torch

from grace_hf.commands.baseline_clip import main
from grace_hf.commands.cli import main as cli_main
from grace_hf.data.karpathy import load_karpathy
from grace_hf.data.pseudo_queries import load_pseudo_queries
from grace_hf.data.synthetic import write_synthetic
from grace_hf.dense import DualEncoder, load_dual_encoder, resolve_model_config
from grace_hf.dense.directory import FEATURES_FILE, load_image_features, save_image_features
from grace_hf.dense.training import DenseTrainingArgs, training_texts
from grace_hf.errors import GraceInputError

# Smaller than the `tiny` preset: one layer per tower, so a run takes about a second.
MICRO = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "layers": 1, "width": 32, "head_width": 16},
    "text_cfg": {"context_length": 24, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = write_synthetic(tmp_path_factory.mktemp("synthetic"), 40, seed=0, num_workers=1)
    config = root / "micro.json"
    config.write_text(json.dumps(MICRO))
    return root, config


def _run(synthetic, output_dir, epochs=25):
    root, config = synthetic
    argv = ["--karpathy-json", str(root / "dataset_synthetic.json"), "--image-root", str(root)]
    argv += ["--pseudo-queries", str(root / "pseudo_queries.json"), "--output-dir", str(output_dir)]
    argv += ["--model-config", str(config), "--epochs", str(epochs), "--batch-size", "20", "--lr", "5e-3"]
    assert main(argv) == 0
    return output_dir


@pytest.fixture(scope="module")
def run_dir(synthetic, tmp_path_factory):
    return _run(synthetic, tmp_path_factory.mktemp("runs") / "dense")


def test_training_texts_are_the_t2id_pairs(synthetic):
    root, _ = synthetic
    corpus = load_karpathy(root / "dataset_synthetic.json", root)
    pseudo = load_pseudo_queries(root / "pseudo_queries.json", corpus)
    texts = training_texts(corpus, pseudo)
    assert set(texts) == {image.key for image in corpus.memorized()}
    for image in corpus.memorized():
        assert texts[image.key] == (image.captions if image.split == "train" else pseudo[image.key])
    assert set(training_texts(corpus, None)) == {image.key for image in corpus.split("train")}


def test_run_writes_model_features_and_metrics(synthetic, run_dir):
    root, _ = synthetic
    corpus = load_karpathy(root / "dataset_synthetic.json", root)
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".grace_hf_output.json",
        "image_features.safetensors",
        "metrics.json",
        "open_clip_config.json",
        "open_clip_model.safetensors",
    ]
    features, keys = load_image_features(run_dir / FEATURES_FILE)
    assert keys == [image.key for image in corpus.memorized()]
    assert features.shape == (len(keys), MICRO["embed_dim"])
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(len(keys)))

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == "dense-clip"
    for key in ("recall@1", "recall@5", "recall@10"):
        assert 0.0 <= metrics[key] <= 1.0
    curve = metrics["recall_curve"]
    assert len(curve) == 10 and curve == sorted(curve)
    assert [curve[0], curve[4], curve[9]] == [metrics["recall@1"], metrics["recall@5"], metrics["recall@10"]]
    num_test = len(corpus.split("test"))
    assert metrics["num_candidates"] == num_test
    assert metrics["num_queries"] == sum(len(image.captions) for image in corpus.split("test"))
    assert metrics["train_seconds"] > 0 and metrics["query_latency_ms"] > 0
    assert metrics["train_images"] == 40 and metrics["train_steps"] == 25 * 2  # batches of 20
    losses = metrics["epoch_losses"]
    assert len(losses) == 25 and losses[-1] < 0.8 * losses[0]


def test_saved_encoder_reproduces_the_features(synthetic, run_dir):
    root, _ = synthetic
    encoder = load_dual_encoder(run_dir)
    features, keys = load_image_features(run_dir)
    torch.testing.assert_close(encoder.encode_images([root / key for key in keys[:5]]), features[:5])
    config = json.loads((run_dir / "open_clip_config.json").read_text())
    assert config["model_cfg"] == resolve_model_config(MICRO)
    assert config["tokenizer"] == {"class": "open_clip.SimpleTokenizer", "context_length": 24}


def test_same_seed_same_features(synthetic, tmp_path):
    first, _ = load_image_features(_run(synthetic, tmp_path / "first", epochs=3))
    again, _ = load_image_features(_run(synthetic, tmp_path / "again", epochs=3))
    assert torch.equal(again, first)


def test_config_presets_and_errors(tmp_path):
    torch.manual_seed(0)
    assert DualEncoder.from_config("tiny").encode_texts(["a red star"]).shape == (1, 64)
    with pytest.raises(GraceInputError, match="neither a preset"):
        resolve_model_config("huge")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**MICRO, "text_cfg": {**MICRO["text_cfg"], "vocab_size": 1000}}))
    with pytest.raises(GraceInputError, match="vocab_size must be 49408"):
        resolve_model_config(bad)
    with pytest.raises(GraceInputError, match="image features file not found"):
        load_image_features(tmp_path / "missing.safetensors")
    with pytest.raises(GraceInputError, match="batch-size"):
        DenseTrainingArgs(batch_size=1)
    with pytest.raises(ValueError, match="3 feature rows for 2 image keys"):
        save_image_features(tmp_path / "f.safetensors", torch.zeros(3, 4), ["a", "b"])


def test_cli_reports_a_bad_config(synthetic, tmp_path, capsys):
    root, _ = synthetic
    argv = ["baseline-clip", "--karpathy-json", str(root / "dataset_synthetic.json"), "--image-root", str(root)]
    assert cli_main([*argv, "--output-dir", str(tmp_path / "out"), "--model-config", "huge"]) == 2
    assert "grace-hf baseline-clip: error: --model-config 'huge'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()

"""The dense baseline: a tiny open_clip dual encoder trained and evaluated on 40 synthetic images."""

import json

import pytest
import torch

from grace_hf.commands.baseline_clip import main
from grace_hf.commands.cli import main as cli_main
from grace_hf.data.karpathy import load_karpathy
from grace_hf.data.pseudo_queries import load_pseudo_queries
from grace_hf.dense import DualEncoder, load_dual_encoder, resolve_model_config, training
from grace_hf.dense.directory import FEATURES_FILE, load_image_features, save_image_features
from grace_hf.dense.training import DenseTrainingArgs, EarlyStopping, train_dual_encoder, training_texts
from grace_hf.errors import GraceInputError
from grace_hf.evaluation.text_baseline import run_text_baseline
from grace_hf.training.views import ImageViews
from tests.helpers import MICRO


@pytest.fixture(scope="module")
def synthetic(synthetic, micro_config):
    """40 synthetic images and the micro dual encoder's config."""
    return synthetic(40), micro_config


def _run(synthetic, output_dir, epochs=25, patience=5, karpathy_json="dataset_synthetic.json"):
    root, config = synthetic
    argv = ["--karpathy-json", str(root / karpathy_json), "--image-root", str(root)]
    argv += ["--pseudo-queries", str(root / "oracle_pseudo_queries.json"), "--output-dir", str(output_dir)]
    argv += ["--model-config", str(config), "--epochs", str(epochs), "--batch-size", "20", "--lr", "5e-3"]
    assert main([*argv, "--patience", str(patience)]) == 0
    return output_dir


@pytest.fixture(scope="module")
def run_dir(synthetic, tmp_path_factory):
    return _run(synthetic, tmp_path_factory.mktemp("runs") / "dense")


def test_training_texts_are_the_t2id_pairs(synthetic):
    root, _ = synthetic
    corpus = load_karpathy(root / "dataset_synthetic.json", root)
    pseudo = load_pseudo_queries(root / "oracle_pseudo_queries.json", corpus)
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
    epochs_run = metrics["epochs_run"]
    assert metrics["train_images"] == 40 and metrics["train_steps"] == epochs_run * 2  # batches of 20
    losses = metrics["epoch_losses"]
    assert len(losses) == epochs_run and losses[-1] < 0.8 * losses[0]


def test_run_stops_on_val_and_keeps_the_best_epoch(synthetic, run_dir):
    root, _ = synthetic
    metrics = json.loads((run_dir / "metrics.json").read_text())
    per_epoch, best = metrics["val_recall@1_per_epoch"], metrics["best_epoch"]
    assert metrics["stopping"] == "early stopping on val R@1, patience 5, at most 25 epochs"
    assert len(per_epoch) == metrics["epochs_run"] and per_epoch[best - 1] == max(per_epoch)
    # it stopped early, 5 epochs after the best one or after the 3 warm-up epochs (seeded: the same on every run)
    assert metrics["epochs_run"] == max(best, 3) + 5 < 25
    # the saved model is the best epoch's: its val figure is that epoch's
    assert metrics["val"]["recall@1"] == per_epoch[best - 1]
    corpus = load_karpathy(root / "dataset_synthetic.json", root)
    assert metrics["val"]["num_queries"] == len(corpus.caption_queries("val"))


def test_early_stopping_counts_epochs_without_gain():
    model = torch.nn.Linear(2, 1)
    stopping = EarlyStopping(patience=2)
    assert [stopping.update(model, score, epoch) for epoch, score in enumerate([0.1, 0.3, 0.3, 0.2], 1)] == [
        False,
        False,
        False,
        True,  # equal is no gain
    ]
    assert stopping.best_epoch == 2 and stopping.best_score == 0.3


def test_early_stopping_counts_no_epoch_of_the_warm_up():
    """Scores during the learning-rate warm-up say little: patience starts counting once it is over."""
    model = torch.nn.Linear(2, 1)
    stopping = EarlyStopping(patience=2, warmup_epochs=5)
    stops = [
        stopping.update(model, score, epoch) for epoch, score in enumerate([0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1], 1)
    ]
    assert stops == [False] * 6 + [True]  # best at epoch 1, but no stop before epoch 5 + 2


def test_training_stops_early_and_keeps_the_best_weights(synthetic):
    """A scripted validation: the score peaks after epoch 2, so with patience 2 training stops after epoch 4 and the
    encoder ends with epoch 2's weights."""
    root, config = synthetic
    corpus = load_karpathy(root / "dataset_synthetic.json", root)
    texts = training_texts(corpus, load_pseudo_queries(root / "oracle_pseudo_queries.json", corpus))
    torch.manual_seed(0)
    encoder = DualEncoder.from_config(config)
    scores, snapshots = iter([0.1, 0.5, 0.4, 0.3, 0.9, 0.9]), []

    def validate(encoder):
        snapshots.append({name: value.clone() for name, value in encoder.model.state_dict().items()})
        return next(scores)

    args = DenseTrainingArgs(epochs=10, patience=2, batch_size=20, lr=5e-3)
    result = train_dual_encoder(
        encoder, {image.key: image.path for image in corpus.memorized()}, texts, args, validate
    )
    assert (result.epochs_run, result.best_epoch, result.val_scores) == (4, 2, [0.1, 0.5, 0.4, 0.3])
    assert result.steps == 4 * 2 and len(snapshots) == 4
    final = encoder.model.state_dict()
    assert all(torch.equal(final[name], value) for name, value in snapshots[1].items())
    assert not all(torch.equal(final[name], value) for name, value in snapshots[3].items())


def test_without_val_images_training_runs_every_epoch(synthetic, tmp_path):
    root, _ = synthetic
    data = json.loads((root / "dataset_synthetic.json").read_text())
    for image in data["images"]:
        image["split"] = "train" if image["split"] == "val" else image["split"]
    (root / "no_val.json").write_text(json.dumps(data))
    metrics = json.loads(
        (_run(synthetic, tmp_path / "dense", epochs=3, karpathy_json="no_val.json") / "metrics.json").read_text()
    )
    assert metrics["stopping"] == "fixed 3 epochs: no val images with captions to stop on"
    assert metrics["epochs_run"] == 3 and metrics["best_epoch"] is None and metrics["val"] is None


def test_bm25_metrics_have_the_dense_format(synthetic, run_dir, tmp_path):
    root, _ = synthetic
    dense = json.loads((run_dir / "metrics.json").read_text())
    bm25 = run_text_baseline(
        root / "dataset_synthetic.json", root, tmp_path / "bm25", root / "oracle_pseudo_queries.json"
    )
    shared = {"method", "recall@1", "recall@5", "recall@10", "recall_curve", "num_queries", "num_candidates"}
    shared |= {"query_latency_ms", "queries_per_second", "train_seconds", "val"}
    assert shared <= set(dense) and shared <= set(bm25)
    assert set(bm25) - shared == {"candidates_without_text"}
    assert set(bm25["val"]) - {"candidates_without_text"} == set(dense["val"]) - {"eval_batch_size"}
    assert (bm25["num_queries"], bm25["num_candidates"]) == (dense["num_queries"], dense["num_candidates"])


def test_saved_encoder_reproduces_the_features(synthetic, run_dir):
    root, _ = synthetic
    encoder = load_dual_encoder(run_dir)
    features, keys = load_image_features(run_dir)
    torch.testing.assert_close(encoder.encode_images([root / key for key in keys[:5]]), features[:5])
    config = json.loads((run_dir / "open_clip_config.json").read_text())
    assert config["model_cfg"] == resolve_model_config(MICRO)
    assert config["tokenizer"] == {"class": "open_clip.SimpleTokenizer", "context_length": 24}


def test_same_seed_same_features_with_or_without_the_pixel_cache(synthetic, tmp_path, monkeypatch):
    """The training images preprocessed once (they fit) train exactly as images read every epoch."""
    root, config = synthetic
    paths = sorted((root / "images").glob("*.png"))[:5]
    encoder = DualEncoder.from_config(config)
    pixels = training.preprocessed_images(paths, encoder)
    assert list(pixels) == paths and torch.equal(pixels[paths[1]], encoder.pixel_values([paths[1]])[0])
    assert training.preprocessed_images(paths, encoder, max_bytes=100) == {}  # too many bytes: read every epoch

    first, _ = load_image_features(_run(synthetic, tmp_path / "first", epochs=4, patience=0))
    monkeypatch.setattr(training, "PIXEL_CACHE_BYTES", 0)
    again, _ = load_image_features(_run(synthetic, tmp_path / "again", epochs=4, patience=0))
    assert torch.equal(again, first)
    metrics = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 4  # --patience 0: every epoch runs


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
    with pytest.raises(GraceInputError, match="--patience >= 0"):
        DenseTrainingArgs(patience=-1)
    with pytest.raises(ValueError, match="3 feature rows for 2 image keys"):
        save_image_features(tmp_path / "f.safetensors", torch.zeros(3, 4), ["a", "b"])


def test_cli_reports_a_bad_config(synthetic, tmp_path, capsys):
    root, _ = synthetic
    argv = ["baseline-clip", "--karpathy-json", str(root / "dataset_synthetic.json"), "--image-root", str(root)]
    assert cli_main([*argv, "--output-dir", str(tmp_path / "out"), "--model-config", "huge"]) == 2
    assert "grace-hf baseline-clip: error: --model-config 'huge'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_training_views_change_each_image_per_epoch_and_slip_adds_a_second_view(synthetic):
    root, config = synthetic
    paths = sorted((root / "images").glob("*.png"))[:3]
    encoder = DualEncoder.from_config(config)
    views = ImageViews(crop_scale=0.7, jpeg_quality=40)
    images = training.preprocessed_images(paths, encoder, views=views)
    assert all(image.mode == "RGB" and image.size == (64, 64) for image in images.values())  # kept as read
    pairs = [(i, path, "a red star") for i, path in enumerate(paths)]
    dataset = training._PairDataset(pairs, encoder, images, views, seed=0, epoch=3, num_views=2)
    (first, second), tokens, has_text = dataset[1]
    assert has_text
    assert torch.equal(first, encoder.transform(views(images[paths[1]], 0, 3, 1)))
    assert torch.equal(second, encoder.transform(views(images[paths[1]], 0, 3, -2))) and not torch.equal(first, second)
    later = training._PairDataset(pairs, encoder, images, views, seed=0, epoch=4)[1][0]
    assert len(later) == 1 and not torch.equal(later[0], first)  # another epoch, another view
    plain = training._PairDataset(pairs, encoder, None, ImageViews())[1][0]
    assert torch.equal(plain[0], encoder.pixel_values([paths[1]])[0]) and torch.equal(tokens, dataset[1][1])


def test_views_and_the_image_image_term_train_by_default_and_are_recorded(synthetic, tmp_path, capsys):
    root, config = synthetic
    argv = ["--karpathy-json", str(root / "dataset_synthetic.json"), "--image-root", str(root)]
    argv += ["--model-config", str(config), "--epochs", "3", "--patience", "0", "--batch-size", "20", "--lr", "5e-3"]
    no_views = ["--crop-scale", "1", "--jpeg-quality", "0"]
    assert main([*argv, "--output-dir", str(tmp_path / "plain"), *no_views, "--image-loss-weight", "0"]) == 0
    assert main([*argv, "--output-dir", str(tmp_path / "slip")]) == 0
    plain, slip = (json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("plain", "slip"))
    assert slip["views"] == {"flip": False, "crop_scale": 0.7, "jpeg_quality": 40, "original_share": 0.0}
    assert plain["views"] == {"flip": False, "crop_scale": 1.0, "jpeg_quality": 0, "original_share": 0.0}
    assert (slip["image_loss_weight"], plain["image_loss_weight"]) == (1.0, 0.0)
    # the image-image InfoNCE term adds about log(batch) to the first epoch's loss
    assert slip["epoch_losses"][0] > plain["epoch_losses"][0] + 1.5
    assert not torch.equal(load_image_features(tmp_path / "slip")[0], load_image_features(tmp_path / "plain")[0])
    for bad, message in (
        (no_views, "needs views that change images"),
        (["--crop-scale", "1.5"], "training views: crop scale must be in"),
        (["--jpeg-quality", "200"], "training views: JPEG quality must be"),
        (["--image-loss-weight", "-1"], "--image-loss-weight must be >= 0"),
        (["--every-image", "--image-loss-weight", "0"], "--every-image extends the image-image term"),
    ):
        capsys.readouterr()
        assert cli_main(["baseline-clip", *argv, "--output-dir", str(tmp_path / "bad"), *bad]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_every_image_joins_each_batch_of_captioned_images_with_as_many_without_text(synthetic):
    root, _ = synthetic
    paths = {f"k{i}": path for i, path in enumerate(sorted((root / "images").glob("*.png"))[:8])}
    keys, image_only = ["k0", "k1", "k2", "k3", "k4"], ["k5", "k6", "k7"]
    texts = {key: [f"text {key}"] for key in keys}
    plain = training._epoch_pairs(keys, paths, texts, torch.Generator().manual_seed(0), 2)
    assert len(plain) == 4 and all(text is not None for _, _, text in plain)  # a last batch of one left out
    mixed = training._epoch_pairs(keys, paths, texts, torch.Generator().manual_seed(0), 2, image_only)
    assert mixed[0:2] == plain[0:2] and mixed[4:6] == plain[2:4]  # the captioned halves, in the same order
    extra = mixed[2:4] + mixed[6:8]
    assert all(text is None and index >= len(keys) for index, _, text in extra)
    assert {path for _, path, _ in extra} == {paths[key] for key in image_only}  # each one, then again from the top
    assert all(path == paths[image_only[index - len(keys)]] for index, path, _ in extra)
    dataset = training._PairDataset(mixed, DualEncoder.from_config(synthetic[1]))
    assert [dataset[i][2] for i in range(4)] == [True, True, False, False]


def test_every_image_trains_the_image_term_on_images_without_text_and_is_recorded(synthetic, tmp_path):
    """The val and test images have no text without pseudo-queries: --every-image adds them to the image-image
    term; with pseudo-queries every memorized image has text, and the flag changes nothing."""
    root, config = synthetic
    argv = ["--karpathy-json", str(root / "dataset_synthetic.json"), "--image-root", str(root)]
    argv += ["--model-config", str(config), "--epochs", "2", "--patience", "0", "--batch-size", "20"]
    features = {}
    for name, flags in {
        "plain": [],
        "every": ["--every-image"],
        "texts": ["--pseudo-queries", str(root / "oracle_pseudo_queries.json")],
        "texts-every": ["--pseudo-queries", str(root / "oracle_pseudo_queries.json"), "--every-image"],
    }.items():
        assert main([*argv, *flags, "--output-dir", str(tmp_path / name)]) == 0
        features[name] = load_image_features(tmp_path / name)[0]
    assert json.loads((tmp_path / "every" / "metrics.json").read_text())["every_image"] is True
    assert json.loads((tmp_path / "plain" / "metrics.json").read_text())["every_image"] is False
    assert not torch.equal(features["every"], features["plain"])
    assert torch.equal(features["texts-every"], features["texts"])

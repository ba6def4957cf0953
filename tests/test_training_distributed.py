"""Launched runs on CPU: single-process DeepSpeed ZeRO-3, and 2-process DDP over gloo."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from benchmarks.common import free_port
from tests.helpers import add_argv, tiny_recipe, train_old, write_collections, write_recipe

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

ZERO3_CPU = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "DEEPSPEED",
    "deepspeed_config": {
        "zero_stage": 3,
        "gradient_clipping": 1.0,
        "zero3_init_flag": True,
        "zero3_save_16bit_model": True,
        "offload_optimizer_device": "none",
        "offload_param_device": "none",
    },
    "num_machines": 1,
    "num_processes": 1,
    "machine_rank": 0,
    "use_cpu": False,
    "mixed_precision": "no",
}

# records, per process, the image keys each batch held and every save_pretrained call
PROBE = textwrap.dedent(
    """
    import json, os, sys
    from grace_hf.training.collate import GraceCollator
    from grace_hf.models.flamingo import FlamingoForConditionalGeneration
    from grace_hf.training import loop as train

    rank = os.environ.get("RANK", "0")
    probe = os.environ["GRACE_PROBE_DIR"]

    def record(name, obj):
        with open(os.path.join(probe, f"{name}-{rank}.jsonl"), "a") as f:
            f.write(json.dumps(obj) + "\\n")

    collate = GraceCollator.__call__
    def recording_collate(self, rows):
        record("batches", {"task": self.task, "keys": [row["image_key"] for row in rows]})
        return collate(self, rows)

    save_pretrained = FlamingoForConditionalGeneration.save_pretrained
    def recording_save(self, *args, **kwargs):
        record("saves", str(args[0]))
        return save_pretrained(self, *args, **kwargs)

    save_model_directory = train.save_model_directory
    def recording_save_model_directory(accelerator, model, *args, **kwargs):
        record("final", {
            "distributed_type": str(accelerator.distributed_type),
            "weights_sum": sum(p.double().sum().item() for p in accelerator.unwrap_model(model).parameters()),
        })
        return save_model_directory(accelerator, model, *args, **kwargs)

    GraceCollator.__call__ = recording_collate
    FlamingoForConditionalGeneration.save_pretrained = recording_save
    train.save_model_directory = recording_save_model_directory
    from grace_hf.commands import train as train_command
    sys.exit(train_command.main(sys.argv[1:]))
    """
)


def _recipe(path, prepared, output_dir, **overrides) -> str:
    """The tiny recipe for 3 steps of 2 processes, a checkpoint at the end."""
    fields = {"max_steps": 3, "batch_size_t2id": 4, "save_steps": 3, "eval_num_queries": 2, "i2id_flip": False}
    return write_recipe(path, tiny_recipe(prepared, output_dir, **{**fields, **overrides}))


def _launch(launch_args, script_args, probe_dir):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRACE_PROBE_DIR": str(probe_dir), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command + launch_args + script_args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _records(probe_dir, name, rank):
    path = Path(probe_dir) / f"{name}-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_zero3_single_process_trains_saves_and_retrieves(prepared, tmp_path):
    from grace_hf.retrieval import GraceRetriever

    config = tmp_path / "zero3_cpu.yaml"
    config.write_text(yaml.safe_dump(ZERO3_CPU))
    recipe = _recipe(tmp_path / "recipe.yaml", prepared(), tmp_path / "out", max_steps=2, save_steps=2)
    _launch(["--config_file", str(config), "-m", "grace_hf", "train"], ["--config", recipe], tmp_path)

    out = tmp_path / "out"
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    weights = load_file(out / "model.safetensors")
    config_json = json.loads((out / "config.json").read_text())
    embed = weights["model.embed_tokens.weight"]
    assert embed.shape == (config_json["text_config"]["vocab_size"], config_json["text_config"]["d_model"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and "recall@1" in metrics
    retriever = GraceRetriever.from_pretrained(out)
    hits = retriever.retrieve(["a red circle"], top_k=2)[0]
    assert hits and all(hit.image_key in retriever.index.collection for hit in hits)


def test_two_cpu_processes_shard_the_data_and_save_once(prepared, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    recipe = _recipe(tmp_path / "recipe.yaml", prepared(), tmp_path / "out")
    _launch(
        ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", str(script)], ["--config", recipe], tmp_path
    )

    # i2id rows are one per image: at every step the two processes read disjoint images, and the 3 steps of
    # 2 x 4 rows cover the 24 images once
    i2id = [
        [batch["keys"] for batch in _records(tmp_path, "batches", rank) if batch["task"] == "i2id"] for rank in (0, 1)
    ]
    assert len(i2id[0]) == len(i2id[1]) == 3
    for first, second in zip(*i2id):
        assert not set(first) & set(second)
    seen = [key for rank_batches in i2id for batch in rank_batches for key in batch]
    assert len(seen) == len(set(seen)) == 24

    # the gradients were synchronised: both processes end with the same weights
    final = [_records(tmp_path, "final", rank)[0] for rank in (0, 1)]
    assert final[0]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert final[0]["weights_sum"] == final[1]["weights_sum"]

    out = tmp_path / "out"
    assert _records(tmp_path, "saves", 0) and not _records(tmp_path, "saves", 1)
    assert len(_records(tmp_path, "saves", 0)) == 1
    assert json.loads((out / "metrics.json").read_text())["num_processes"] == 2
    assert (out / "checkpoints" / "step-3" / "trainer_state.json").is_file()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
    assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def _old_model_and_new_images(tmp_path, kind):
    """A tiny model trained on the first 22 of 30 synthetic images; the last 8 are the new collection."""
    old, new = write_collections(tmp_path)
    _, model = train_old(tmp_path / "old", old, kind)
    return model, new


def test_add_images_with_two_cpu_processes(tmp_path):
    from grace_hf.identifiers import IdentifierIndex
    from grace_hf.retrieval import GraceRetriever

    model, new = _old_model_and_new_images(tmp_path, "structured")
    out = tmp_path / "added"
    launch = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "-m", "grace_hf"]
    _launch(launch, ["add-images", *add_argv(model, new, out, "--save-steps", "2")], tmp_path)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 2
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    assert len(IdentifierIndex.load(out).images) == 30
    assert GraceRetriever.from_pretrained(out).retrieve(["a red circle"], top_k=2)[0]


def test_add_images_under_zero3_starts_atomic_tokens_from_their_captions(tmp_path):
    from grace_hf.models.flamingo import FlamingoProcessor

    model, new = _old_model_and_new_images(tmp_path, "atomic")
    config = tmp_path / "zero3_cpu.yaml"
    config.write_text(yaml.safe_dump(ZERO3_CPU))
    out = tmp_path / "added"
    # a learning rate of 0: the saved new rows are their starting values
    argv = add_argv(model, new, out, "--learning-rate", "0", "--max-steps", "1")
    _launch(["--config_file", str(config), "-m", "grace_hf"], ["add-images", *argv], tmp_path)

    old_table = load_file(model / "model.safetensors")["model.embed_tokens.weight"]
    table = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    processor = FlamingoProcessor.from_pretrained(out)
    pseudo = json.loads((new / "oracle_pseudo_queries.json").read_text())
    karpathy = json.loads((new / "dataset_synthetic.json").read_text())
    for n, image in enumerate(karpathy["images"], start=22):
        texts = [s["raw"] for s in image["sentences"]] if image["split"] == "train" else pseudo[image["filename"]]
        ids = [i for text in texts for i in processor.tokenizer(text, add_special_tokens=False)["input_ids"]]
        row = processor.tokenizer.convert_tokens_to_ids(f"<img_{n}>")
        assert row == len(old_table) + n - 22
        torch.testing.assert_close(table[row], old_table[ids].mean(0))

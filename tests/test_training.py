"""Training: arguments, data order, the two-task step, checkpoints, a tiny run and kill-and-resume."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import set_seed
from safetensors.torch import load_file

from grace_hf.commands import train as train_command
from grace_hf.errors import GraceInputError
from grace_hf.model_dir import read_model_dir
from grace_hf.training import loop as train_module
from grace_hf.training import parse_args
from grace_hf.training.args import ADD_IMAGES_ARGUMENT_CLASSES, ARGUMENT_CLASSES
from grace_hf.training.checkpoints import list_checkpoints, resolve_checkpoint, save_checkpoint
from grace_hf.training.collate import GraceCollator
from grace_hf.training.data import load_training_data
from grace_hf.training.loop import step_loss
from grace_hf.training.modeling import build_model_and_processor, optimizer_parameter_groups
from grace_hf.training.sampling import StepBatchSampler

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(data, output_dir, **overrides) -> dict:
    """A recipe that trains the tiny preset for a few steps on the 24-image synthetic set."""
    recipe = {
        "model_preset": "tiny",
        "tokenizer_vocab_size": 300,
        "data": str(data),
        "output_dir": str(output_dir),
        "max_steps": 6,
        "batch_size_i2id": 4,
        "batch_size_t2id": 8,
        "learning_rate": 2e-3,
        "warmup_steps": 1,
        "logging_steps": 1,
        "save_steps": 2,
        "save_total_limit": 0,
        "eval_num_queries": 4,
        "num_beams": 2,
        "report_to": "none",
        "seed": 0,
        "torch_num_threads": 1,  # the same reduction order in every process, so runs compare bit for bit
    }
    recipe.update(overrides)
    return recipe


def write_recipe(path, recipe) -> str:
    Path(path).write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return str(path)


def reset_accelerate():
    """Forget the Accelerate singletons so the next in-process run starts like a fresh process."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_training(argv):
    try:
        assert train_command.main(argv) == 0
    finally:
        reset_accelerate()


# arguments


def test_recipe_sets_defaults_and_flags_override(tmp_path, prepared):
    config = write_recipe(tmp_path / "r.yaml", tiny_recipe(prepared, tmp_path / "out", t2id_image="blank"))
    model_args, data_args, args = parse_args(
        ["--config", config, "--max_steps", "9", "--seed", "3", "--output-dir", "elsewhere", "--data", "d"]
    )
    assert (args.max_steps, args.seed, args.output_dir, data_args.data) == (9, 3, "elsewhere", "d")
    assert (model_args.model_preset, data_args.t2id_image, args.learning_rate) == ("tiny", "blank", 2e-3)
    assert args.report_to == ["none"]


def test_recipe_can_switch_off_a_flag_that_defaults_to_true(tmp_path, prepared):
    config = write_recipe(tmp_path / "r.yaml", tiny_recipe(prepared, tmp_path / "out", i2id_flip=False))
    assert parse_args(["--config", config])[1].i2id_flip is False
    assert parse_args(["--config", config, "--i2id_flip"])[1].i2id_flip is True
    assert parse_args(["--config", config, "--no_freeze_vision"])[0].freeze_vision is False


def test_unknown_keys_are_errors_naming_the_key(tmp_path, prepared):
    config = write_recipe(tmp_path / "r.yaml", tiny_recipe(prepared, tmp_path / "out", learning_rat=1.0))
    with pytest.raises(GraceInputError, match="unknown key 'learning_rat'"):
        parse_args(["--config", config])
    config = write_recipe(tmp_path / "r.yaml", tiny_recipe(prepared, tmp_path / "out"))
    with pytest.raises(GraceInputError, match="--warmup 3"):
        parse_args(["--config", config, "--warmup", "3"])
    with pytest.raises(GraceInputError, match="t2id_image: 'gray' is not one of"):
        parse_args(["--config", write_recipe(tmp_path / "r.yaml", tiny_recipe(prepared, "o", t2id_image="gray"))])


def test_cross_field_checks(tmp_path, prepared):
    config = write_recipe(tmp_path / "r.yaml", tiny_recipe(prepared, tmp_path / "out"))
    with pytest.raises(GraceInputError, match="both loss weights are 0"):
        parse_args(["--config", config, "--loss_weight_i2id", "0", "--loss_weight_t2id", "0"])
    with pytest.raises(GraceInputError, match="exactly one of model and model_preset"):
        parse_args(["--config", config, "--model", "some/model"])
    with pytest.raises(GraceInputError, match="lr_scheduler_type: unknown 'linearr'"):
        parse_args(["--config", config, "--lr_scheduler_type", "linearr"])


def test_eval_split_val_ranks_the_val_images_with_their_captions(tmp_path, prepared):
    from grace_hf.data.prepared import load_prepared

    config = write_recipe(tmp_path / "r.yaml", tiny_recipe(prepared, tmp_path / "out", eval_num_queries=1000))
    model_args, data_args, args = parse_args(["--config", config, "--eval_split", "val"])
    data = load_training_data(data_args, args)
    val = load_prepared(prepared)["val_queries"]
    assert data.eval_queries == list(val["query"]) and data.eval_gold == list(val["image_key"])
    assert data.eval_candidates == list(dict.fromkeys(val["image_key"])) and data.eval_candidates
    assert not set(data.eval_candidates) & set(data.index.collection)  # not the test images
    test = load_training_data(*parse_args(["--config", config])[1:])
    assert test.eval_candidates is None and set(test.eval_gold) <= set(test.index.collection)

    old = tmp_path / "old-prepared"  # prepared before the val captions were kept
    splits = load_prepared(prepared)
    del splits["val_queries"]
    splits.save_to_disk(str(old))
    shutil.copy(prepared / "identifiers.json", old / "identifiers.json")
    assert load_training_data(*parse_args(["--config", config, "--data", str(old)])[1:]).eval_candidates is None
    with pytest.raises(GraceInputError, match=f"{old}: the prepared dataset has no 'val_queries' split"):
        load_training_data(*parse_args(["--config", config, "--data", str(old), "--eval_split", "val"])[1:])


def test_eval_split_val_is_recorded_in_the_metrics(tmp_path, prepared):
    recipe = tiny_recipe(prepared, tmp_path / "out", max_steps=2, save_steps=0, eval_split="val")
    run_training(["--config", write_recipe(tmp_path / "r.yaml", recipe)])
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["eval_split"] == "val" and metrics["num_eval_queries"] == 4 and "recall@1" in metrics


# data order


def test_data_order_is_a_function_of_the_step():
    unbroken = iter(StepBatchSampler(10, 3, seed=1))
    batches = [next(unbroken) for _ in range(8)]
    resumed = iter(StepBatchSampler(10, 3, seed=1, start_step=5))
    assert [next(resumed) for _ in range(3)] == batches[5:]
    # every row once per epoch, a new order for the next epoch
    epoch0 = [index for batch in batches for index, epoch in batch if epoch == 0]
    epoch1 = [index for batch in batches for index, epoch in batch if epoch == 1]
    assert sorted(epoch0) == list(range(10)) and sorted(epoch1) == list(range(10)) and epoch0 != epoch1


def test_processes_read_disjoint_slices_of_the_global_batch():
    single = iter(StepBatchSampler(24, 8, seed=0))
    ranks = [iter(StepBatchSampler(24, 4, seed=0, rank=r, world_size=2)) for r in range(2)]
    for _ in range(5):
        first, second = next(ranks[0]), next(ranks[1])
        assert not set(first) & set(second)
        assert first + second == next(single)


# the step


def test_two_task_step_equals_the_sum_of_the_two_losses(prepared, tmp_path):
    model_args, data_args, args = parse_args(
        ["--config", write_recipe(tmp_path / "r.yaml", tiny_recipe(prepared, "o"))]
    )
    data = load_training_data(data_args, args)
    torch.manual_seed(0)
    model, processor = build_model_and_processor(model_args, data.tokenizer_texts, data.index.new_tokens)
    rows = {s.name: [dict(s.rows[i]) for i in range(3)] for s in data.streams}
    batches = {name: GraceCollator(processor, name, t2id_image="blank")(rows[name]) for name in rows}
    weights = {"i2id": 0.5, "t2id": 2.0}

    total, losses = step_loss(model, batches, weights)
    total.backward()
    summed = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    expected = 0.0
    for name, batch in batches.items():
        loss = model(**batch).loss
        (weights[name] * loss).backward()
        expected += weights[name] * loss.item()
        assert losses[name].item() == pytest.approx(loss.item(), rel=1e-6)
    separate = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert summed.keys() == separate.keys()
    for name in summed:
        torch.testing.assert_close(summed[name], separate[name], rtol=1e-5, atol=1e-7)


def test_weight_decay_only_on_gated_cross_attention(prepared, tmp_path):
    model_args, data_args, args = parse_args(
        ["--config", write_recipe(tmp_path / "r.yaml", tiny_recipe(prepared, "o"))]
    )
    data = load_training_data(data_args, args)
    model, _ = build_model_and_processor(model_args, data.tokenizer_texts, data.index.new_tokens)
    decay, no_decay = optimizer_parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = [names[id(p)] for p in decay["params"]]
    assert decayed and all(".gated_cross_attn." in n and "gate" not in n.rsplit(".", 1)[-1] for n in decayed)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert not any(n.startswith("model.vision_model.") for n in map(names.get, map(id, no_decay["params"])))


# checkpoints


class _FakeAccelerator:
    """Enough of an Accelerator for `save_checkpoint`; `fail` makes `save_state` die half-way."""

    is_main_process = True

    def __init__(self, fail=False):
        self.fail = fail

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        (Path(path) / "model.safetensors").write_text("weights")
        if self.fail:
            raise RuntimeError("killed while saving")


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(_FakeAccelerator(), tmp_path, step, {"scheduler": {}}, total_limit=2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4, 6]
    with pytest.raises(RuntimeError):
        save_checkpoint(_FakeAccelerator(fail=True), tmp_path, 8, {"scheduler": {}}, total_limit=2)
    assert resolve_checkpoint(tmp_path, "latest").name == "step-6"
    assert json.loads((tmp_path / "checkpoints/step-6/trainer_state.json").read_text())["step"] == 6
    with pytest.raises(GraceInputError, match="no checkpoint to resume from"):
        resolve_checkpoint(tmp_path / "empty", "latest")


# whole runs

# SIGKILLs the training process at the point named by KILL_AT
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import grace_hf.training.checkpoints as checkpoints
    import grace_hf.training.saving as saving
    import grace_hf.training.loop as train

    where, _, at = os.environ["KILL_AT"].partition(":")

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "step":  # between two optimizer steps
        step = train._Trainer._step

        def step_then_die(self, *args):
            result = step(self, *args)
            if self.step == int(at):
                die()
            return result

        train._Trainer._step = step_then_die
    elif where == "checkpoint":  # the checkpoint's files written, not yet renamed into place
        write = checkpoints.atomic_write_json

        def write_then_die(path, obj):
            if obj.get("step") == int(at):
                die()
            write(path, obj)

        checkpoints.atomic_write_json = write_then_die
    elif where == "final":  # the first final file renamed into the output, the others not
        replace = os.replace

        def replace_then_die(source, target):
            replace(source, target)
            if saving.STAGING_PREFIX in str(source):
                die()

        os.replace = replace_then_die
    from grace_hf.commands import train as train_command
    sys.exit(train_command.main(sys.argv[1:]))
    """
)


def _pushed_copy(destination):
    """HfApi methods that write into `destination` instead of the network."""

    def create_repo(self, repo_id, **kwargs):
        (destination / repo_id).mkdir(parents=True, exist_ok=True)

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
        ignore = shutil.ignore_patterns(*(pattern.split("/")[0] for pattern in ignore_patterns))
        shutil.copytree(folder_path, destination / repo_id, ignore=ignore, dirs_exist_ok=True)
        return f"file://{destination / repo_id}"

    return create_repo, upload_folder


@pytest.fixture(scope="module")
def reference_run(prepared, tmp_path_factory):
    """An unbroken 6-step run (also pushed to a fake Hub)."""
    root = tmp_path_factory.mktemp("reference")
    recipe = write_recipe(root / "recipe.yaml", tiny_recipe(prepared, root / "out"))
    hub = root / "hub"
    create_repo, upload_folder = _pushed_copy(hub)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("huggingface_hub.HfApi.create_repo", create_repo)
        patch.setattr("huggingface_hub.HfApi.upload_folder", upload_folder)
        run_training(["--config", recipe, "--push_to_hub", "me/grace-tiny"])
    return root / "out", recipe, hub / "me/grace-tiny"


def _log(output_dir):
    lines = (Path(output_dir) / train_module.LOG_HISTORY_FILE).read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_tiny_run_learns_and_writes_a_model_directory(reference_run, prepared):
    output_dir, recipe, _ = reference_run
    log = _log(output_dir)
    assert [record["step"] for record in log] == [1, 2, 3, 4, 5, 6]
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "identifiers.json"):
        assert (output_dir / name).is_file(), name
    assert json.loads((output_dir / "grace_config.json").read_text()) == {
        "query_image": "none",
        "identifier_kind": "structured",
        "num_identifiers": 24,
    }
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["identifier_kind"] == "structured" and metrics["steps"] == 6 and metrics["train_seconds"] > 0
    assert {"recall@1", "recall@5", "recall@10"} <= metrics.keys()
    assert (output_dir / "README.md").read_text().startswith("---\n")
    assert [step for step, _ in list_checkpoints(output_dir)] == [2, 4, 6]

    # every trained parameter moved, the frozen vision tower did not
    model_args, data_args, args = parse_args(["--config", recipe])
    data = load_training_data(data_args, args)
    set_seed(args.seed)
    initial, _ = build_model_and_processor(model_args, data.tokenizer_texts, data.index.new_tokens)
    trained = load_file(output_dir / "model.safetensors")
    for name, parameter in initial.named_parameters():
        if name not in trained:
            continue  # the tied lm_head
        moved = not torch.equal(parameter.detach(), trained[name])
        assert moved == parameter.requires_grad, name


def test_saved_directory_retrieves_and_pushes(reference_run):
    from grace_hf.retrieval import GraceRetriever, IdentifierTrie

    output_dir, _, pushed = reference_run
    assert (pushed / "README.md").is_file() and not (pushed / "checkpoints").exists()
    for directory in (output_dir, pushed):
        retriever = GraceRetriever.from_pretrained(directory)
        saved_trie = IdentifierTrie.load(directory / "identifier_trie.safetensors")
        assert retriever.trie.metadata == saved_trie.metadata  # the saved trie is current, so it was used
        hits = retriever.retrieve(["a red circle"], top_k=2)[0]
        assert hits and all(hit.image_key in retriever.index.collection for hit in hits)


@pytest.mark.slow
def _kill(recipe, tmp_path, kill_at):
    """Run the recipe in a subprocess and SIGKILL it at `kill_at` (a point of KILLER, or `log:N`: as soon as N steps
    are logged, wherever the run then is)."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KILL_AT": kill_at}
    process = subprocess.Popen(
        [sys.executable, str(script), "--config", recipe], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )
    if kill_at.startswith("log:"):
        history = tmp_path / "out" / train_module.LOG_HISTORY_FILE
        deadline = time.monotonic() + 240
        while process.poll() is None and time.monotonic() < deadline:
            if history.is_file() and len(history.read_text().splitlines()) >= int(kill_at[4:]):
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == -signal.SIGKILL, stderr[-2000:]


# kill points: between steps, inside a checkpoint, inside the final save, and two moments picked at random by a
# fixed seed among the steps (the kill lands wherever the run is when N steps are logged)
KILL_POINTS = ["step:3", "checkpoint:4", "final"] + [f"log:{n}" for n in random.Random(0).sample(range(2, 6), 2)]


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", KILL_POINTS)
def test_killed_at_any_moment_resumes_to_the_same_weights(kill_at, reference_run, tmp_path, prepared):
    reference_dir, _, _ = reference_run
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(prepared, tmp_path / "out"))
    _kill(recipe, tmp_path, kill_at)
    output = tmp_path / "out"
    assert list_checkpoints(output), "a kill past the first checkpoint leaves one to resume from"
    with pytest.raises(GraceInputError, match="has not finished"):
        read_model_dir(output)
    with pytest.raises(GraceInputError, match="holds an unfinished run; resume it"):
        run_training(["--config", recipe])

    run_training(["--config", recipe, "--resume-from-checkpoint", "latest"])
    resumed = load_file(output / "model.safetensors")
    reference = load_file(reference_dir / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert torch.equal(resumed[name], reference[name]), name
    assert [r["loss"] for r in _log(output)] == [r["loss"] for r in _log(reference_dir)]
    assert read_model_dir(output).index is not None
    assert sorted(p.name for p in output.iterdir() if p.name.startswith(".")) == [".grace_hf_output.json"]


def test_killed_before_the_first_checkpoint_starts_again(tmp_path, prepared):
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe(prepared, tmp_path / "out"))
    _kill(recipe, tmp_path, "step:1")
    assert (tmp_path / "out").is_dir() and not list_checkpoints(tmp_path / "out")
    with pytest.raises(GraceInputError, match="no checkpoint to resume from .yet.; run again without"):
        run_training(["--config", recipe, "--resume-from-checkpoint", "latest"])
    run_training(["--config", recipe])
    assert [step for step, _ in list_checkpoints(tmp_path / "out")] == [2, 4, 6]


@pytest.mark.parametrize(
    "recipe", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").glob("*/*.yaml")), ids=lambda p: p
)
def test_every_shipped_recipe_parses(recipe):
    argv, classes = ["--config", str(ROOT / recipe)], ARGUMENT_CLASSES
    if recipe.endswith("add_images.yaml"):  # the model and the new images come from the command line
        argv += [
            "--model",
            "runs/old",
            "--output-dir",
            "runs/added",
            "--karpathy-json",
            "new.json",
            "--image-root",
            ".",
        ]
        classes = ADD_IMAGES_ARGUMENT_CLASSES
    model_args, data_args, args = parse_args(argv, classes)
    assert args.output_dir.startswith("runs/") and (model_args.model or model_args.model_preset)
    if recipe.endswith("rq.yaml"):
        assert data_args.data == f"data/prepared/{Path(recipe).parent.name}-rq"

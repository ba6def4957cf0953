"""The training loop: teach a Flamingo to memorize images as identifiers and to retrieve them from text (GRACE).

Each optimizer step sums the i2id loss and the t2id loss, with one backward of the sum. Stages:
seed -> data -> model -> optimizer/schedule -> resume -> train (log, evaluate, checkpoint) -> save -> push.
`task: captioner` trains the same model on train image -> caption pairs instead (for `grace-hf pseudo-queries`).
Launched by `grace-hf train` or `accelerate launch -m grace_hf train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors import SafetensorError
from transformers import get_scheduler

from grace_hf.distributed import create_accelerator
from grace_hf.errors import GraceInputError
from grace_hf.io_utils import atomic_write_text, read_json
from grace_hf.model_dir import LOGS_DIR, GraceConfig
from grace_hf.outputs import MODEL, OutputBuild, begin_output, build_path, check_output_dir, portable_path
from grace_hf.runtime import configure_threads, progress_bar
from grace_hf.training.args import DataArguments, GraceTrainingArguments, ModelArguments
from grace_hf.training.checkpoints import TRAINER_STATE_FILE, list_checkpoints, resolve_checkpoint, save_checkpoint
from grace_hf.training.data import TrainingData, load_training_data, stream_batches
from grace_hf.training.evaluation import evaluate_recall
from grace_hf.training.model_card import render_model_card
from grace_hf.training.modeling import build_model_and_processor, count_parameters, optimizer_parameter_groups
from grace_hf.training.saving import push_directory, save_model_directory

__all__ = ["LOG_HISTORY_FILE", "batch_to_device", "configure_deepspeed", "create_optimizer", "step_loss", "train"]

LOG_HISTORY_FILE = f"{LOGS_DIR}/log_history.jsonl"
# arguments of one run, not of the model: left out of the model card and training_args.json
RUN_SPECIFIC = ("output_dir", "resume_from_checkpoint", "push_to_hub", "report_to", "overwrite")


def step_loss(
    model: Any,
    batches: dict[str, dict[str, torch.Tensor]],
    weights: dict[str, float],
    no_sync: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's loss, `sum_task weights[task] * loss(batches[task])`, and each task's (detached) loss.

    Every forward but the last runs under `no_sync` (DDP's: the one backward of the sum then reduces once).
    """
    total, losses = None, {}
    for position, (name, batch) in enumerate(batches.items()):
        context = no_sync() if position < len(batches) - 1 else contextlib.nullcontext()
        with context:
            loss = model(**batch).loss
        losses[name] = loss.detach()
        total = weights[name] * loss if total is None else total + weights[name] * loss
    return total, losses


def create_optimizer(
    model: torch.nn.Module, accelerator: Accelerator, learning_rate: float, weight_decay: float
) -> torch.optim.AdamW:
    """AdamW over `optimizer_parameter_groups`. On a GPU without DeepSpeed it is the fused kernel: one pass over the
    parameters and their two moments instead of the multi-tensor path's several, the largest fixed cost of a small
    step for a 3B model; the update is the same (to float rounding)."""
    fused = accelerator.device.type == "cuda" and accelerator.state.deepspeed_plugin is None
    groups = optimizer_parameter_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=learning_rate, **({"fused": True} if fused else {}))


def batch_to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on `device`; from page-locked memory the copies do not wait for the GPU to finish the last step."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def configure_deepspeed(accelerator: Accelerator, micro_batch_size: int, max_grad_norm: float) -> None:
    """Fill the DeepSpeed values the config leaves to the script (no dataloader is passed to `prepare`)."""
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = max_grad_norm


def _total_steps(args: GraceTrainingArguments, data: TrainingData, world_size: int) -> int:
    if args.max_steps > 0:
        return args.max_steps
    main = data.streams[0]  # i2id when on, else t2id; the captions for the captioner
    return max(1, math.ceil(args.num_epochs * len(main.rows) / (main.batch_size * world_size)))


def _hyperparameters(*arguments: Any) -> dict[str, Any]:
    """All arguments as tracker-friendly scalars."""
    flat = {}
    for obj in arguments:
        for key, value in dataclasses.asdict(obj).items():
            flat[key] = value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
    return flat


class _Trainer:
    """One run's state; `run()` goes through the stages of the module docstring."""

    def __init__(
        self,
        model_args: ModelArguments,
        data_args: DataArguments,
        args: GraceTrainingArguments,
        command: str,
        data: TrainingData | None = None,
    ) -> None:
        self.model_args, self.data_args, self.args, self.command = model_args, data_args, args, command
        self.started = time.monotonic()
        configure_threads(args.torch_num_threads)
        self.build = build_path(args.output_dir)  # everything is written here; it becomes the output when complete
        self.output: OutputBuild | None = None
        self.checkpoint = self._check_output()  # before any work
        self.data = data if data is not None else load_training_data(data_args, args)
        # t2id without an image and no i2id leaves the perceiver and cross-attention without gradients
        uses_images = any(s.name != "t2id" for s in self.data.streams) or data_args.t2id_image == "blank"
        self.accelerator = create_accelerator(args.report_to, self.build, find_unused_parameters=not uses_images)
        if self.accelerator.is_main_process:
            self._open_output()
        try:
            self._set_up()
        except BaseException:
            self.abandon()
            raise

    def _set_up(self) -> None:
        args, model_args = self.args, self.model_args
        self.accelerator.wait_for_everyone()
        set_seed(args.seed)
        new_tokens = self.data.index.new_tokens if self.data.index is not None else []
        self.model, self.processor = build_model_and_processor(
            model_args, self.data.tokenizer_texts, new_tokens, self.data.token_texts
        )
        self.num_steps = _total_steps(args, self.data, self.accelerator.num_processes)
        optimizer = create_optimizer(self.model, self.accelerator, args.learning_rate, args.weight_decay)
        # stepped here once per optimizer step (not prepared: Accelerate would step it once per process)
        self.scheduler = get_scheduler(
            args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=self.num_steps
        )
        configure_deepspeed(self.accelerator, sum(s.step_batch_size for s in self.data.streams), args.max_grad_norm)
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.weights = {stream.name: stream.weight for stream in self.data.streams}
        self.step, self.previous_seconds = 0, 0.0

    # output and resume
    def _inputs(self) -> list:
        inputs = [*self.data_args.input_paths(), *self.model_args.input_paths(), self.args.recipe]
        return inputs + ([self.checkpoint] if self.checkpoint is not None and not self._continues() else [])

    def _continues(self) -> bool:
        """Whether the run resumes from a checkpoint of its own unfinished run (in the build directory)."""
        return self.checkpoint is not None and self.build.resolve() in self.checkpoint.resolve().parents

    def _check_output(self) -> Path | None:
        """The checkpoint to resume from (None: a fresh run), after checking that the output may be written."""
        spec = self.args.resume_from_checkpoint
        self.checkpoint = resolve_checkpoint(self.args.output_dir, spec) if spec is not None else None
        check_output_dir(self.args.output_dir, MODEL, self._inputs(), self.args.overwrite)
        return self.checkpoint

    def _open_output(self) -> None:
        """Lock the output and open its build directory (main process); the old output stays as it is until the
        run is complete."""
        self.output = begin_output(
            self.args.output_dir,
            MODEL,
            self._inputs(),
            self.args.overwrite,
            self.command,
            resumable=True,
            resume=self._continues(),
        )
        history = self.build / LOG_HISTORY_FILE
        if self._continues() and history.is_file():  # the steps after the checkpoint will be logged again
            step = json.loads((self.checkpoint / TRAINER_STATE_FILE).read_text(encoding="utf-8"))["step"]
            lines = history.read_text(encoding="utf-8").splitlines(keepends=True)
            atomic_write_text(history, "".join(line for line in lines if json.loads(line)["step"] <= step))

    def abandon(self) -> None:
        """Leave the old output as it was (main process); the build directory is kept when it holds checkpoints."""
        if self.output is not None:
            self.output.abandon(keep=bool(list_checkpoints(self.build)))
            self.output = None

    def resume(self) -> None:
        path = self.checkpoint
        state = read_json(path / TRAINER_STATE_FILE, "trainer state")
        try:
            self.accelerator.load_state(str(path))
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.previous_seconds = int(state["step"]), float(state["train_seconds"])
        except (RuntimeError, OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            raise GraceInputError(
                f"{path}: cannot resume from this checkpoint (truncated, or written by another model or recipe): "
                f"{type(err).__name__}: {str(err)[:300]}"
            ) from None
        if state["world_size"] != self.accelerator.num_processes:
            self.accelerator.print(
                f"warning: {path} was written by {state['world_size']} processes, resuming with "
                f"{self.accelerator.num_processes}: the data order differs from an unbroken run"
            )
        self.accelerator.print(f"resumed from {path} at step {self.step}")

    def _train_seconds(self) -> float:
        return self.previous_seconds + time.monotonic() - self.started

    def _batches(self) -> dict[str, Iterator[dict]]:
        accelerator = self.accelerator
        return {
            stream.name: stream_batches(
                stream,
                self.processor,
                self.data_args,
                seed=self.args.seed + position,
                rank=accelerator.process_index,
                world_size=accelerator.num_processes,
                start_step=self.step,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=accelerator.device.type == "cuda",
            )
            for position, stream in enumerate(self.data.streams)
        }

    # evaluate
    def evaluate(self) -> dict[str, float]:
        """Recall@K on the evaluation queries; every process searches a shard of them."""
        if self.data.index is None or not self.data.eval_queries:
            return {}
        return evaluate_recall(
            self.accelerator.unwrap_model(self.model),
            self.processor,
            self.data.index,
            self.data.eval_queries,
            self.data.eval_gold,
            query_image=self.data_args.t2id_image,
            num_beams=self.args.num_beams,
            batch_size=self.args.eval_batch_size,
            distributed=self.accelerator.num_processes > 1,
            candidates=self.data.eval_candidates,
        )

    # train
    def _step(self, iterators: dict[str, Iterator[dict]], no_sync: Callable) -> tuple[dict[str, torch.Tensor], Any]:
        """One optimizer step; returns the tasks' detached losses and the gradient norm (None without clipping)."""
        device = self.accelerator.device
        batches = {name: batch_to_device(next(iterator), device) for name, iterator in iterators.items()}
        total, losses = step_loss(self.model, batches, self.weights, no_sync)
        self.accelerator.backward(total)
        grad_norm = None
        if self.args.max_grad_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return losses, grad_norm

    def _log(self, sums: dict[str, torch.Tensor], window: int, grad_norm: Any) -> dict[str, float]:
        """Mean losses of the window (averaged over processes), learning rate and gradient norm, to the trackers
        and `logs/log_history.jsonl`."""
        means = {name: self.accelerator.reduce(value / window, "mean").item() for name, value in sums.items()}
        logs = {f"loss_{name}": value for name, value in means.items()}
        logs["loss"] = sum(self.weights[name] * value for name, value in means.items())
        logs["lr"] = self.scheduler.get_last_lr()[0]
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        self.accelerator.log(logs, step=self.step)
        if self.accelerator.is_main_process:
            path = self.build / LOG_HISTORY_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": self.step, **logs}) + "\n")
        return logs

    def _evaluate_during_training(self) -> None:
        metrics = self.evaluate()
        if metrics:
            self.accelerator.log({f"eval/{key}": value for key, value in metrics.items()}, step=self.step)
            self.accelerator.print(f"step {self.step}: {metrics}")

    def _checkpoint(self) -> None:
        trainer_state = {
            "scheduler": self.scheduler.state_dict(),
            "world_size": self.accelerator.num_processes,
            "train_seconds": self._train_seconds(),
        }
        save_checkpoint(self.accelerator, self.build, self.step, trainer_state, self.args.save_total_limit)

    def train(self) -> dict[str, float]:
        """Run the remaining steps; return the mean losses of the last logging window."""
        args, accelerator = self.args, self.accelerator
        iterators = self._batches()
        no_sync = (
            functools.partial(accelerator.no_sync, self.model)
            if isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
            else contextlib.nullcontext
        )
        sums = {name: torch.zeros((), device=accelerator.device) for name in self.weights}
        window, last_logged = 0, {}
        self.model.train()
        progress = progress_bar(
            total=self.num_steps, initial=self.step, disable=not accelerator.is_local_main_process, desc="train"
        )
        while self.step < self.num_steps:
            losses, grad_norm = self._step(iterators, no_sync)
            progress.update(1)
            for name, loss in losses.items():
                sums[name] += loss
            window += 1
            if args.logging_steps and (self.step % args.logging_steps == 0 or self.step == self.num_steps):
                last_logged = self._log(sums, window, grad_norm)
                progress.set_postfix({key: f"{value:.4g}" for key, value in last_logged.items() if "loss" in key})
                sums = {name: torch.zeros_like(value) for name, value in sums.items()}
                window = 0
            if args.eval_steps and self.step % args.eval_steps == 0 and self.step < self.num_steps:
                self._evaluate_during_training()
            if args.save_steps and self.step % args.save_steps == 0:
                self._checkpoint()
        progress.close()
        return last_logged

    # save
    def save(self, metrics: dict[str, Any]) -> None:
        index = self.data.index
        grace_config = GraceConfig.for_index(index, self.data_args.t2id_image) if index is not None else None
        hyperparameters = {
            key: self._portable(value)
            for key, value in _hyperparameters(self.model_args, self.data_args, self.args).items()
            if key not in RUN_SPECIFIC
        }
        arguments = {
            key: self._portable(value)
            for obj in (self.model_args, self.data_args, self.args)
            for key, value in dataclasses.asdict(obj).items()
            if key not in RUN_SPECIFIC
        }
        hyperparameters["num_processes"] = self.accelerator.num_processes
        card = render_model_card(
            task=self.data_args.task,
            identifier_kind=index.kind if index is not None else None,
            base_model=self.model_args.model or f"preset {self.model_args.model_preset} (from scratch)",
            hyperparameters=hyperparameters,
            metrics=metrics,
            launch_command=self.command,
        )
        save_model_directory(
            self.accelerator,
            self.model,
            self.processor,
            self.build,
            index=index,
            grace_config=grace_config,
            metrics=metrics,
            model_card=card,
            codebooks=self.data.codebooks,
            training_args={"command": self.command, "data": self._recorded_sources(), "arguments": arguments},
            write_files=self.data.write_files,
        )

    def _recorded_sources(self) -> list[str]:
        """The training data as `training_args.json` names it: a local dataset that lies in the same build directory
        as the output (the demo's) relative to the output, so that the name holds once the build is renamed."""
        return [self._portable(source) for source in self.data.sources]

    def _portable(self, value: Any) -> Any:
        """A path in the output's build directory as the saved model names it (`portable_path`: relative to the
        output); any other value as it is."""
        return portable_path(value, self.args.output_dir) if isinstance(value, str) and value else value

    def _final_metrics(self, last_logs: dict[str, float]) -> dict[str, Any]:
        metrics: dict[str, Any] = {f"train_{key}": value for key, value in last_logs.items()}
        # wall time from start-up to the last step (checkpoints and evaluations during training included)
        metrics.update(
            steps=self.step, num_processes=self.accelerator.num_processes, train_seconds=self._train_seconds()
        )
        started_eval = time.monotonic()
        metrics.update(self.evaluate())
        if self.data.index is not None:
            metrics.update(
                identifier_kind=self.data.index.kind,
                num_eval_queries=len(self.data.eval_queries),
                eval_split=self.data_args.eval_split,
                eval_seconds=time.monotonic() - started_eval,
            )
        return metrics

    def run(self) -> dict[str, Any]:
        args, accelerator = self.args, self.accelerator
        accelerator.init_trackers("grace_hf", config=_hyperparameters(self.model_args, self.data_args, args))
        sizes = count_parameters(accelerator.unwrap_model(self.model))
        streams = ", ".join(stream.describe() for stream in self.data.streams)
        accelerator.print(
            f"{self.data_args.task}: {self.num_steps} steps x {accelerator.num_processes} processes; streams "
            f"{streams}; {sizes['trainable']:,} of {sizes['total']:,} parameters trained"
        )
        try:
            if self.checkpoint is not None:
                self.resume()
            metrics = self._final_metrics(self.train())
            self.save(metrics)
            if self.output is not None:
                self.output.commit()
        except BaseException:
            self.abandon()
            raise
        accelerator.wait_for_everyone()
        accelerator.print(f"saved {args.output_dir}: {json.dumps(metrics)}")
        if args.push_to_hub and accelerator.is_main_process:
            try:
                accelerator.print(f"pushed: {push_directory(args.output_dir, args.push_to_hub)}")
            except Exception as err:  # offline, no token, no such namespace: the model is saved all the same
                raise GraceInputError(
                    f"--push-to-hub {args.push_to_hub}: the model is saved in {args.output_dir}, but pushing it "
                    f"failed: {type(err).__name__}: {err}"
                ) from None
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return metrics


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    args: GraceTrainingArguments,
    command: str = "grace-hf train",
    data: TrainingData | None = None,
) -> dict[str, Any]:
    """Train, save `args.output_dir` (a model directory `GraceRetriever.from_pretrained` loads) and return the
    final metrics (Recall@K on the evaluation queries, train time).

    `data`: what to train on, when the caller built it (add-images); default: `data_args`' data."""
    return _Trainer(model_args, data_args, args, command, data).run()

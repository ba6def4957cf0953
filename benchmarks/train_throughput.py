"""Training throughput (samples/s) of the GRACE step, side by side for shapes and distributed back-ends.

Each cell launches `accelerate launch` on this file in worker mode: a randomly initialised Flamingo of the shape,
random token batches of the paper's two tasks (i2id: 16 samples of 12 tokens with an image; t2id: 48 samples of
40 tokens, text only), and the training step of `grace_hf.training.loop` (both losses, one backward, AdamW).
It reports (i2id + t2id samples of all processes) / s over the timed steps.

    python benchmarks/train_throughput.py                       # CPU: tiny and medium x DDP, ZeRO-2, ZeRO-3
    python benchmarks/train_throughput.py --shapes 3b --backends single zero3 --num-processes 1   # on a GPU
    python benchmarks/train_throughput.py --shapes 3b --backends single --compare 16x64 64x64     # vs open-flamingo

Shapes: tiny (the tests' preset), medium (a 256-wide 8-layer decoder on 64-px images), small (flamingo_speed.py's:
OpenFlamingo's perceiver and cross-attention on a 512-wide decoder), 3b (OpenFlamingo-3B-vitl-mpt1b: bf16 and
gradient checkpointing, GPU only).

`--compare BxL ...` adds a table for the first shape, one process on one device: the grace_hf training step
(`step_loss` on B samples of L tokens with an image, backward, clipping, `create_optimizer`'s AdamW, batches
copied from page-locked memory as `train` does) beside open-flamingo's `Flamingo` of the same shape
(`flamingo_speed.build_reference`) trained the same way with torch's default AdamW; no gradient checkpointing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

SHAPES = {
    "tiny": ("tiny", {}),
    "medium": (
        "tiny",
        {
            "vision_config": {"image_size": 64, "layers": 4, "width": 256, "head_width": 64, "patch_size": 8},
            "text_config": {"vocab_size": 4096, "d_model": 256, "n_layers": 8, "n_heads": 8},
            "perceiver_num_latents": 16,
            "perceiver_heads": 4,
            "perceiver_head_dim": 64,
            "cross_attn_heads": 4,
            "cross_attn_head_dim": 64,
        },
    ),
    "small": (
        "openflamingo-3b-vitl-mpt1b",
        {
            "vision_config": {"image_size": 64, "layers": 4, "width": 256, "head_width": 64, "patch_size": 8},
            "vision_quick_gelu": False,
            "text_config": {"vocab_size": 2000, "d_model": 512, "n_layers": 8, "n_heads": 8, "qk_ln": False},
            "cross_attn_every_n_layers": 2,
            "media_token_id": 1,
            "end_of_chunk_token_id": 0,
            "pad_token_id": 2,
        },
    ),
    "3b": ("openflamingo-3b-vitl-mpt1b", {}),
}
BATCH = {"i2id": (16, 12), "t2id": (48, 40)}  # task -> (samples per process, tokens)


def _accelerate_config(backend: str, num_processes: int, gpu: bool) -> dict:
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "num_machines": 1,
        "machine_rank": 0,
        "num_processes": num_processes,
        "mixed_precision": "bf16" if gpu else "no",
        "use_cpu": False,
    }
    if backend in ("zero2", "zero3"):
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "zero_stage": int(backend[-1]),
            "gradient_clipping": 1.0,
            "zero3_init_flag": False,
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
        }
    elif backend == "ddp":
        # on CPU the training code turns the launched processes into MULTI_CPU (gloo)
        config["distributed_type"] = "MULTI_GPU"
    else:
        config["distributed_type"] = "NO"
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cell(shape: str, backend: str, num_processes: int, steps: int, warmup: int, gpu: bool) -> dict:
    """Launch one worker and return its measurement (or the error)."""
    return _launch(shape, backend, num_processes, steps, warmup, gpu, ["--worker"])


def _launch(
    shape: str, backend: str, num_processes: int, steps: int, warmup: int, gpu: bool, worker_args: list[str]
) -> dict:
    """`accelerate launch` this file with `worker_args`; the worker's JSON result, or the error."""
    processes = 1 if backend == "single" else num_processes
    with tempfile.TemporaryDirectory() as tmp:
        config_file, result_file = Path(tmp) / "accelerate.yaml", Path(tmp) / "result.json"
        config_file.write_text(yaml.safe_dump(_accelerate_config(backend, processes, gpu)))
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
        command += ["--main_process_port", str(_free_port()), __file__, *worker_args, "--shapes", shape]
        command += ["--steps", str(steps), "--warmup", str(warmup), "--result", str(result_file)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        started = time.monotonic()
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not result_file.exists():
            return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
        result = json.loads(result_file.read_text())
        result["launch_seconds"] = time.monotonic() - started
        return result


def synchronize(accelerator) -> None:
    """Every process done with the work it queued: no step may still be running on a GPU when the clock is read."""
    import torch

    if accelerator.device.type == "cuda":
        torch.cuda.synchronize(accelerator.device)
    accelerator.wait_for_everyone()


def worker(shape: str, steps: int, warmup: int, result_path: str) -> None:
    """Time `steps` training steps of `shape` under the current launch; the main process writes the result."""
    import torch

    from grace_hf.distributed import create_accelerator
    from grace_hf.models.flamingo import FlamingoConfig, FlamingoForConditionalGeneration
    from grace_hf.training.loop import batch_to_device, configure_deepspeed, create_optimizer, step_loss

    accelerator = create_accelerator(report_to=["none"])
    preset, overrides = SHAPES[shape]
    config = FlamingoConfig.from_preset(preset, **overrides)
    torch.manual_seed(0)
    with accelerator.device:  # random weights made where they train (ZeRO partitions them in `prepare`)
        model = FlamingoForConditionalGeneration(config)
    if shape == "3b":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = create_optimizer(model, accelerator, learning_rate=1e-4, weight_decay=0.1)
    configure_deepspeed(accelerator, sum(size for size, _ in BATCH.values()), 1.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    vocab, image_size = config.text_config.vocab_size, config.vision_config["image_size"]
    generator = torch.Generator().manual_seed(accelerator.process_index)

    def batch(task: str) -> dict[str, torch.Tensor]:
        size, length = BATCH[task]
        input_ids = torch.randint(3, vocab, (size, length), generator=generator)
        input_ids[:, 0 if task == "i2id" else length // 2] = config.media_token_id
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
        if task == "i2id":
            inputs["pixel_values"] = torch.randn(size, 1, 1, 3, image_size, image_size, generator=generator)
        if accelerator.device.type == "cuda":  # as `train`'s loader: page-locked
            inputs = {key: value.pin_memory() for key, value in inputs.items()}
        return batch_to_device(inputs, accelerator.device)

    weights = {"i2id": 1.0, "t2id": 1.0}
    for step in range(warmup + steps):
        if step == warmup:
            synchronize(accelerator)
            started = time.monotonic()
        total, _ = step_loss(model, {task: batch(task) for task in BATCH}, weights)
        accelerator.backward(total)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(accelerator)
    seconds = time.monotonic() - started
    if accelerator.is_main_process:
        samples = steps * sum(size for size, _ in BATCH.values()) * accelerator.num_processes
        Path(result_path).write_text(
            json.dumps(
                {
                    "samples_per_second": samples / seconds,
                    "seconds_per_step": seconds / steps,
                    "processes": accelerator.num_processes,
                    "distributed_type": str(accelerator.distributed_type).split(".")[-1],
                    "device": str(accelerator.device),
                }
            )
        )


def compare_worker(model_kind: str, shape: str, batch: int, length: int, steps: int, warmup: int, result_path: str):
    """Time `steps` single-device training steps of grace_hf's model or open-flamingo's on B x L i2id samples."""
    import torch
    from flamingo_speed import build_reference

    from grace_hf.models.flamingo import FlamingoConfig, FlamingoForConditionalGeneration
    from grace_hf.training.loop import batch_to_device, create_accelerator, create_optimizer, step_loss

    accelerator = create_accelerator(report_to=["none"])
    preset, overrides = SHAPES[shape]
    config = FlamingoConfig.from_preset(preset, **overrides)
    torch.manual_seed(0)
    with accelerator.device:  # random weights made where they train: no copy of 3B fp32 weights from the host
        model = FlamingoForConditionalGeneration(config) if model_kind == "grace_hf" else build_reference(config)
    if model_kind == "grace_hf":
        optimizer = create_optimizer(model, accelerator, learning_rate=1e-4, weight_decay=0.1)
    else:  # the same parameters trained (all but the vision tower), with torch's default AdamW
        for name, parameter in model.named_parameters():
            parameter.requires_grad_("vision_encoder" not in name)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, config.text_config.vocab_size - 3, (batch, length), generator=generator)
    input_ids[:, 0] = config.media_token_id
    labels = input_ids.clone()
    labels[:, 0] = -100
    size = config.vision_config["image_size"]
    inputs = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": labels,
        "pixel_values": torch.randn(batch, 1, 1, 3, size, size, generator=generator),
    }
    if accelerator.device.type == "cuda":
        inputs = {key: value.pin_memory() for key, value in inputs.items()}

    def loss_of(on_device: dict) -> torch.Tensor:
        if model_kind == "grace_hf":
            return step_loss(model, {"i2id": on_device}, {"i2id": 1.0})[0]
        return model(
            vision_x=on_device["pixel_values"],
            lang_x=on_device["input_ids"],
            attention_mask=on_device["attention_mask"],
            labels=on_device["labels"],
        )[0]

    for step in range(warmup + steps):
        if step == warmup:
            synchronize(accelerator)
            started = time.monotonic()
        accelerator.backward(loss_of(batch_to_device(inputs, accelerator.device)))
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(accelerator)
    seconds = time.monotonic() - started
    Path(result_path).write_text(
        json.dumps({"samples_per_second": steps * batch / seconds, "seconds_per_step": seconds / steps})
    )


def parse_batch_shape(text: str) -> tuple[int, int]:
    """'16x64' -> (16, 64)."""
    batch, _, length = text.partition("x")
    return int(batch), int(length)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["tiny", "medium"], choices=sorted(SHAPES))
    parser.add_argument(
        "--backends", nargs="+", default=["ddp", "zero2", "zero3"], choices=["single", "ddp", "zero2", "zero3"]
    )
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--compare", nargs="+", default=[], metavar="BxL", help="grace_hf vs open-flamingo at these batch shapes"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compare-worker", choices=["grace_hf", "open-flamingo"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.shapes[0], args.steps, args.warmup, args.result)
        return 0
    if args.compare_worker:
        compare_worker(
            args.compare_worker,
            args.shapes[0],
            *parse_batch_shape(args.compare[0]),
            args.steps,
            args.warmup,
            args.result,
        )
        return 0

    import torch

    gpu = torch.cuda.is_available()
    print(
        f"device: {torch.cuda.get_device_name() if gpu else f'CPU ({os.cpu_count()} cores)'}; {args.steps} timed steps"
    )
    print("| shape | back-end | processes | samples/s | s/step |\n| --- | --- | --- | --- | --- |")
    for shape in args.shapes:
        if shape == "3b" and not gpu:
            print("| 3b | - | - | skipped: needs a GPU | |")
            continue
        for backend in args.backends:
            result = run_cell(shape, backend, args.num_processes, args.steps, args.warmup, gpu)
            if "error" in result:
                print(f"| {shape} | {backend} | - | failed: {result['error']} | |")
            else:
                print(
                    f"| {shape} | {backend} ({result['distributed_type']}) | {result['processes']} "
                    f"| {result['samples_per_second']:.1f} | {result['seconds_per_step']:.3f} |"
                )
    if args.compare and (args.shapes[0] != "3b" or gpu):
        shape = args.shapes[0]
        print(f"\n{shape}, one process: grace_hf vs open-flamingo, i2id samples with an image, no checkpointing")
        print(
            "| batch | grace_hf s/step | grace_hf samples/s | open-flamingo s/step | open-flamingo samples/s | speed-up |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for batch_shape in args.compare:
            results = {
                kind: _launch(
                    shape,
                    "single",
                    1,
                    args.steps,
                    args.warmup,
                    gpu,
                    ["--compare-worker", kind, "--compare", batch_shape],
                )
                for kind in ("grace_hf", "open-flamingo")
            }
            failed = {kind: result["error"] for kind, result in results.items() if "error" in result}
            if failed:
                print(f"| {batch_shape} | failed: {failed} | | | | |")
                continue
            ours, theirs = results["grace_hf"], results["open-flamingo"]
            print(
                f"| {batch_shape} | {ours['seconds_per_step']:.3f} | {ours['samples_per_second']:.1f} "
                f"| {theirs['seconds_per_step']:.3f} | {theirs['samples_per_second']:.1f} "
                f"| {ours['samples_per_second'] / theirs['samples_per_second']:.2f}x |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

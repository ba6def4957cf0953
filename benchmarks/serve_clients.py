"""Drive a `grace-hf serve` app: start it in a subprocess on a free loopback port, and send queries from concurrent
plain-HTTP clients, timing each. `serve_load.py` beside it and the serve tests use it.

The clients speak the app's plain HTTP API (POST the inputs, read the answer from the event stream) rather than
`gradio_client`, whose result polling (50 ms sleeps) would dominate the latencies measured."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from grace_hf.serving.app import API_NAME

__all__ = ["LoadRun", "free_port", "run_clients", "search_http", "serve_subprocess"]

Request = tuple[str, int]  # (query, top_k)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextmanager
def serve_subprocess(argv: Sequence[str], timeout: float = 180.0, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `grace-hf serve <argv> --port <free port>` (on 127.0.0.1 unless argv says otherwise) until the block
    ends; yield its URL once it answers. Its output goes to a log whose end is quoted if it fails to start."""
    port = free_port()
    command = [sys.executable, "-m", "grace_hf.commands.cli", "serve", *argv, "--port", str(port)]
    url = f"http://127.0.0.1:{port}/"
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + timeout
            while not _answers(url + "gradio_api/info"):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    state = f"exited with {process.returncode}" if process.poll() is not None else "is not up"
                    raise RuntimeError(f"`{' '.join(command)}` {state}:\n{log.read()[-3000:]}")
                time.sleep(0.25)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class LoadRun:
    """What the clients got: `answers[c][i]` is client c's i-th answer (the app's JSON); latencies in seconds."""

    answers: list[list[dict]]
    latencies: list[float]
    seconds: float

    @property
    def queries_per_second(self) -> float:
        return len(self.latencies) / self.seconds

    def latency_ms(self, percentile: float) -> float:
        return 1e3 * float(np.percentile(self.latencies, percentile))


def search_http(url: str, query: str, top_k: int, timeout: float = 60.0) -> tuple[str, list]:
    """One call of the `/search` endpoint over plain HTTP: `(event, data)`, where event is "complete" (data: the
    outputs `[gallery, status, answer]`) or "error". A refusal (e.g. a full queue) raises `urllib.error.HTTPError`."""
    body = json.dumps({"data": [query, top_k]}).encode()
    post = urllib.request.Request(f"{url}gradio_api/call/{API_NAME}", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=timeout) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{url}gradio_api/call/{API_NAME}/{event_id}", timeout=timeout) as stream:
        event = None
        for line in stream:
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event in ("complete", "error"):
                return event, json.loads(line.removeprefix("data: "))
    raise ConnectionError(f"{url}: the event stream of {event_id} ended without an answer")


def run_clients(url: str, requests: Sequence[Sequence[Request]], timeout: float = 60.0) -> LoadRun:
    """One client per entry of `requests`, all at once; each sends its requests one after another and waits at most
    `timeout` seconds for each answer. Any error, refusal or timeout is raised."""

    def client_run(own: Sequence[Request]) -> tuple[list[dict], list[float]]:
        answers, latencies = [], []
        for query, top_k in own:
            start = time.perf_counter()
            event, data = search_http(url, query, top_k, timeout)
            latencies.append(time.perf_counter() - start)
            if event != "complete":
                raise RuntimeError(f"{url}: {query!r} failed: {data}")
            answers.append(data[2])
        return answers, latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        outcomes = list(pool.map(client_run, requests))
    seconds = time.perf_counter() - start
    return LoadRun([answers for answers, _ in outcomes], [t for _, times in outcomes for t in times], seconds)

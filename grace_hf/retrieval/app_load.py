"""Drive a `grace-hf serve` app: start it in a subprocess on a free loopback port, and send queries from concurrent
`gradio_client` clients, timing each. The serve tests and `benchmarks/serve_load.py` use it."""

from __future__ import annotations

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
from gradio_client import Client

from grace_hf.retrieval.app import API_NAME

__all__ = ["LoadRun", "free_port", "run_clients", "serve_subprocess"]

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
    command = [sys.executable, "-m", "grace_hf.cli", "serve", *argv, "--port", str(port)]
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


def run_clients(url: str, requests: Sequence[Sequence[Request]], timeout: float = 60.0) -> LoadRun:
    """One `gradio_client.Client` per entry of `requests`, all at once; each sends its requests one after another
    and waits at most `timeout` seconds for each answer. An error or a timeout in any client is raised."""

    def client_run(own: Sequence[Request]) -> tuple[list[dict], list[float]]:
        client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
        answers, latencies = [], []
        for query, top_k in own:
            start = time.perf_counter()
            _, _, answer = client.submit(query, top_k, api_name=f"/{API_NAME}").result(timeout=timeout)
            latencies.append(time.perf_counter() - start)
            answers.append(answer)
        return answers, latencies

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        outcomes = list(pool.map(client_run, requests))
    seconds = time.perf_counter() - start
    return LoadRun([answers for answers, _ in outcomes], [t for _, times in outcomes for t in times], seconds)

"""`fermi serve ray --min-replicas 1 --max-replicas 2`, live on a local Ray instance of its own:
a queue on the one replica makes Ray Serve start the second, which then answers requests."""

from __future__ import annotations

import itertools
import threading
import time

import httpx

from fermi.ray_serve.bench import serve_ray
from tests.test_openai_server import BASE_ENV, MODEL

ENV = {**BASE_ENV, "FERMI_API_KEY": "", "FERMI_THREADS": "1", "RAY_DEDUP_LOGS": "0"}


def test_a_queue_adds_a_replica(tiny_artifact):
    args = ("--min-replicas", "1", "--max-replicas", "2")
    with serve_ray(str(tiny_artifact), ENV, replicas=None, num_cpus=2, args=args) as server:
        seen: set[str] = set()
        stop = threading.Event()
        numbers = itertools.count()

        def client() -> None:
            with httpx.Client(base_url=server.url, timeout=120) as http:
                while not stop.is_set():
                    # distinct openings: distinct routing keys, spread over the replicas
                    task = [{"role": "user", "content": f"Task {next(numbers)}"}]
                    body = {"model": MODEL, "max_tokens": 400, "ignore_eos": True, "messages": task}
                    response = http.post("/v1/chat/completions", json=body)
                    assert response.status_code == 200, response.text
                    seen.add(response.headers["x-fermi-replica"])

        clients = [threading.Thread(target=client, daemon=True) for _ in range(4)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 180
        while len(seen) < 2 and time.monotonic() < deadline:
            assert all(thread.is_alive() for thread in clients), "a request failed"
            time.sleep(0.5)
        stop.set()
        for thread in clients:
            thread.join(120)
        assert len(seen) == 2, f"no second replica within 180 s:\n{server.log_tail()}"

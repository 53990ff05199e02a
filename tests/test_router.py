"""SGLang's router (sglang-router, the Rust load balancer) in front of NLD workers on CPU.

- Two LinearSpec workers (one bound core each) behind `python -m sglang_router.launch_router`:
  concurrent requests through the router equal the same requests sent to one worker directly,
  and both workers serve some (their `nemodiff_requests_total`).
- A worker killed mid-run: every request the router answered 200 is right, and after the router
  has marked the worker down it answers every request from the survivor.
- `python -m sglang_nemodiff.router_server --dp 2 --algorithm linearspec`: sglang-router's one-
  command launcher with the plugin's flags (its own module cannot parse them)."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import BLOCK32, CPU_ARGS, SERVER_ENV, generate, generate_many, meta
from sglang_nemodiff.bundled import bundled_model_path
from sglang_nemodiff.servers import ManagedServer, free_port

pytestmark = pytest.mark.slow
MAX_NEW = 40


class Router:
    """`python -m sglang_router.launch_router` over the given worker URLs."""

    def __init__(self, worker_urls, log_path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Health checks every second, one failure marks a worker down (the defaults take ~1 min).
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
               "--port", str(self.port), "--policy", "round_robin", "--worker-urls", *worker_urls,
               "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
               "--prometheus-port", str(free_port()), "--log-level", "warn"]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, probe_ids, timeout=300):
        """The router answers 503 until its workers have registered: wait for a 200."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            assert self.proc.poll() is None, "router exited"
            try:
                r = requests.post(self.url + "/generate", timeout=60, json={
                    "input_ids": probe_ids, "sampling_params": {"max_new_tokens": 1}})
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError("router not ready")

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.log.close()


def requests_served(worker) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(worker.url + "/metrics", timeout=60).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "nemodiff_requests_total")


@pytest.fixture(scope="module")
def router_setup(server_pool, prompts, tmp_path_factory):
    server_pool.stop_all()  # each worker takes one of the two cores
    logs = tmp_path_factory.mktemp("router")
    cores = (os.environ.get("NEMODIFF_TEST_CORES") or "0,1").split(",")
    workers = [ManagedServer(bundled_model_path(), "linearspec",
                             [*CPU_ARGS, *BLOCK32, "--enable-metrics"],
                             log_path=str(logs / f"worker{i}.log"),
                             # the router's /health probes: no generation (they would count)
                             env={**os.environ, **SERVER_ENV, "SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "false",
                                  "SGLANG_CPU_OMP_THREADS_BIND": cores[i % len(cores)]})
               for i in range(2)]
    router = None
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_ready(timeout=900)
        router = Router([w.url for w in workers], logs / "router.log")
        router.wait_ready(prompts[0])
        yield router, workers
    finally:
        if router is not None:
            router.stop()
        for w in workers:
            w.stop()


@pytest.fixture(scope="module")
def direct_answers(router_setup, prompts):
    """Each prompt (twice over: 16 requests) sent to worker 0 directly."""
    _, workers = router_setup
    return [r["output_ids"] for r in generate_many(workers[0], prompts * 2, MAX_NEW)]


def test_router_equals_a_worker_and_uses_both(router_setup, prompts, direct_answers):
    router, workers = router_setup
    before = [requests_served(w) for w in workers]
    through = generate_many(router, prompts * 2, MAX_NEW)
    assert [r["output_ids"] for r in through] == direct_answers
    assert all(meta(r, "nemodiff_algorithm") == "linearspec" for r in through)
    served = [requests_served(w) - b for w, b in zip(workers, before)]
    assert sum(served) == len(through) and min(served) > 0, served


def test_worker_killed_mid_run(router_setup, prompts, direct_answers):
    """32 concurrent requests, worker 1 killed after the first answers: no 200 answer is wrong;
    the rest are errors or retried on the survivor (printed); afterwards every request is
    answered 200 by worker 0."""
    router, workers = router_setup
    expected = direct_answers * 2  # prompts x 4

    def send(ids):
        try:
            r = requests.post(router.url + "/generate", timeout=300, json={
                "input_ids": ids, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0}})
            return r.status_code, (r.json().get("output_ids") if r.status_code == 200 else r.text[:200])
        except requests.RequestException as exc:
            return None, repr(exc)[:200]

    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(send, ids) for ids in prompts * 4]
        while not any(f.done() for f in futures):
            time.sleep(0.05)
        done_before_kill = sum(f.done() for f in futures)
        os.killpg(workers[1].proc.pid, signal.SIGKILL)  # the whole worker (server, scheduler) at once
        results = [f.result() for f in futures]
    assert done_before_kill < len(futures)  # the kill came mid-run
    ok = [(i, out) for i, (status, out) in enumerate(results) if status == 200]
    assert all(out == expected[i] for i, out in ok)
    failed = [(status, out) for status, out in results if status != 200]
    print(f"killed mid-run ({done_before_kill} answered before): {len(ok)}/{len(results)} answered "
          f"200 (all correct), {len(failed)} failed: "
          f"{sorted(set(str(s) for s, _ in failed))}")
    time.sleep(3)  # the router's health check (every 1 s, one failure) marks the worker down
    after = [send(ids) for ids in prompts]
    assert [status for status, _ in after] == [200] * len(prompts), after
    assert [out for _, out in after] == direct_answers[:len(prompts)]


def test_router_server_dp2_with_algorithm(server_pool, prompts, tmp_path):
    """sglang-router's one-command launcher (router + --dp N workers) with --algorithm: the
    workers run LinearSpec (meta_info) and answer == AR (the oracle's)."""
    from sglang_nemodiff.reference import NLDReference, ar_generate

    reference = NLDReference.from_pretrained(bundled_model_path())
    expected = [ar_generate(reference, ids, MAX_NEW, eos_id=11).tokens for ids in prompts]
    server_pool.stop_all()
    launcher = (sys.executable, "-m", "sglang_nemodiff.router_server")
    server = ManagedServer(bundled_model_path(), "linearspec",
                           [*CPU_ARGS, *BLOCK32, "--dp", "2",
                            "--router-dp-worker-base-port", str(free_port()),
                            "--router-health-check-interval-secs", "1",
                            "--router-prometheus-port", str(free_port())],
                           log_path=str(tmp_path / "router_server.log"), launcher=launcher,
                           env={**os.environ, **SERVER_ENV, "SGLANG_CPU_OMP_THREADS_BIND": "0"})
    with server:
        deadline = time.monotonic() + 900
        while True:  # the router's /health_generate is not a worker's: wait for a real answer
            assert server.proc.poll() is None, server.log_tail()
            try:
                response = generate(server, prompts[0], 2)
                if "output_ids" in response:
                    break
            except Exception:
                pass
            assert time.monotonic() < deadline, server.log_tail()
            time.sleep(2)
        responses = generate_many(server, prompts, MAX_NEW)
        assert [r["output_ids"] for r in responses] == expected
        assert all(meta(r, "nemodiff_algorithm") == "linearspec" for r in responses)

"""Runs requests on one engine (a child process) or on N engines (Ray actors).

Requests are sorted by length and cut into fixed chunks (``chunk_size`` requests), the same
chunks whatever the number of engines, so every request is batched with the same neighbours
and scores identically on one replica or on many. With Ray, chunks go to whichever replica is
free (two in flight per replica); a replica that dies has its chunks retried on the others,
and if none is left the run stops with how many requests were scored — never partial results.
Ray is imported only here, only when replicas are asked for.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from collections import deque
from typing import Any, Callable, Sequence

from vllm_mha2mla.tools.evaluation import EvaluationError
from vllm_mha2mla.tools.evaluation.engine import EngineWorker
from vllm_mha2mla.tools.evaluation.requests import Request, Result, request_cost

Progress = Callable[[int], None]
IN_FLIGHT_PER_REPLICA = 2


def make_chunks(requests: Sequence[Request], chunk_size: int) -> list[list[int]]:
    """Indices of ``requests``, longest first, in chunks of ``chunk_size``."""
    order = sorted(range(len(requests)), key=lambda i: (-request_cost(requests[i]), i))
    return [order[i:i + chunk_size] for i in range(0, len(order), chunk_size)]


def _die_with_parent() -> None:
    """Linux: the kernel sends SIGKILL to this process when its parent dies (a killed ``mha2mla
    eval`` must not leave an engine computing for nobody)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(conn, model: str, engine_kwargs: dict, env: dict) -> None:
    _die_with_parent()
    worker = EngineWorker()
    try:
        conn.send(("ready", worker.start(model, engine_kwargs, env)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        chunk = conn.recv()
        if chunk is None:
            return
        try:
            conn.send(("ok", worker.run(chunk)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


def _load_error(model: str, detail: str) -> EvaluationError:
    tail = "\n".join(detail.strip().splitlines()[-6:])
    return EvaluationError(f"vLLM could not load {model}:\n{tail}")


class LocalExecutor:
    """One engine in a spawned child process (a fresh process per model: vLLM engines keep
    global state that two models in one process must not share)."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], env: dict[str, str] | None = None):
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(child_conn, model, engine_kwargs, env or {}))
        self._proc.start()
        child_conn.close()
        self.model = model
        status, payload = self._receive()
        if status != "ready":
            self.close()
            raise _load_error(model, payload)
        self.replicas = [payload]

    def _receive(self) -> tuple[str, Any]:
        try:
            return self._conn.recv()
        except EOFError:
            self._proc.join(5)
            return "error", f"the engine process exited with code {self._proc.exitcode}"

    def run(self, requests: Sequence[Request], chunk_size: int, progress: Progress) -> list[Result]:
        results: list[Result | None] = [None] * len(requests)
        for chunk in make_chunks(requests, chunk_size):
            self._conn.send([requests[i] for i in chunk])
            status, payload = self._receive()
            if status != "ok":
                done = sum(r is not None for r in results)
                raise EvaluationError(f"the engine for {self.model} failed after {done} of {len(requests)} "
                                      f"requests:\n{payload.strip().splitlines()[-1]}")
            for i, res in zip(chunk, payload):
                results[i] = res
            progress(len(chunk))
        return results  # type: ignore[return-value]

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send(None)
            except OSError:
                pass
            self._proc.join(60)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join()


def _split_cpus(cpus: Sequence[int], parts: int, index: int) -> list[int]:
    per = max(1, len(cpus) // parts)
    return list(cpus[index * per:(index + 1) * per]) or list(cpus[:1])


class RayExecutor:
    """``replicas`` engines as Ray actors, each on ``tensor_parallel_size`` GPUs, or, on a
    cluster without GPUs, on its own share of its node's cores and KV-cache memory."""

    def __init__(self, model: str, engine_kwargs: dict[str, Any], replicas: int, address: str | None = None,
                 env: dict[str, str] | None = None, start_timeout_s: float = 1800):
        import ray

        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        self.model = model
        resources = ray.cluster_resources()
        tp = int(engine_kwargs.get("tensor_parallel_size", 1))
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
        if gpus:
            if replicas * tp > gpus:
                raise EvaluationError(f"--replicas {replicas} × --tensor-parallel-size {tp} needs {replicas * tp} "
                                      f"GPUs; the Ray cluster has {gpus}")
            options: dict[str, Any] = {"num_gpus": tp, "num_cpus": 1}
            if tp > 1:  # vLLM's own workers inside the replica: processes, never nested Ray
                engine_kwargs = {**engine_kwargs, "distributed_executor_backend": "mp"}
        else:
            if replicas > cpus:
                raise EvaluationError(f"--replicas {replicas} needs at least {replicas} CPUs; the Ray cluster "
                                      f"has {cpus}")
            options = {"num_cpus": max(1, cpus // replicas)}
        actor_cls = ray.remote(EngineWorker)
        self.actors = [actor_cls.options(**options).remote() for _ in range(replicas)]
        placements = ray.get([a.placement.remote() for a in self.actors], timeout=start_timeout_s)
        starts = []
        for i, actor in enumerate(self.actors):
            kwargs, actor_env = dict(engine_kwargs), dict(env or {})
            if not gpus:  # CPU: a disjoint share of the node's cores and of the KV-cache memory
                peers = [j for j, p in enumerate(placements) if p["node"] == placements[i]["node"]]
                share = _split_cpus(placements[i]["cpus"], len(peers), peers.index(i))
                actor_env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, share))
                if kwargs.get("kv_cache_memory_bytes"):
                    kwargs["kv_cache_memory_bytes"] = int(kwargs["kv_cache_memory_bytes"]) // len(peers)
            starts.append(actor.start.remote(model, kwargs, actor_env))
        try:
            self.replicas = ray.get(starts, timeout=start_timeout_s)
        except ray.exceptions.RayTaskError as exc:
            self.close()
            raise _load_error(model, str(exc)) from None

    def run(self, requests: Sequence[Request], chunk_size: int, progress: Progress) -> list[Result]:
        import ray

        results: list[Result | None] = [None] * len(requests)
        pending = deque(make_chunks(requests, chunk_size))
        alive = set(range(len(self.actors)))
        in_flight: dict[Any, tuple[int, list[int]]] = {}
        scored = 0
        while pending or in_flight:
            for a in sorted(alive):
                while pending and sum(1 for x, _ in in_flight.values() if x == a) < IN_FLIGHT_PER_REPLICA:
                    chunk = pending.popleft()
                    ref = self.actors[a].run.remote([requests[i] for i in chunk])
                    in_flight[ref] = (a, chunk)
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            a, chunk = in_flight.pop(ref)
            try:
                payload = ray.get(ref)
            except ray.exceptions.RayActorError:
                alive.discard(a)
                pending.appendleft(chunk)
                print(f"mha2mla eval: replica {a} of {self.model} died; its work goes to the "
                      f"{len(alive)} left", flush=True)
                if not alive:
                    raise EvaluationError(f"every replica for {self.model} died; {scored} of {len(requests)} "
                                          "requests were scored and no results are written") from None
                continue
            except ray.exceptions.RayTaskError as exc:
                raise EvaluationError(f"a replica for {self.model} failed after {scored} of {len(requests)} "
                                      f"requests:\n{str(exc).strip().splitlines()[-1]}") from None
            for i, res in zip(chunk, payload):
                results[i] = res
            scored += len(chunk)
            progress(len(chunk))
        self.alive = len(alive)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def start_executor(model: str, engine_kwargs: dict[str, Any], replicas: int | None, address: str | None,
                   env: dict[str, str] | None = None) -> LocalExecutor | RayExecutor:
    if replicas is None:
        return LocalExecutor(model, engine_kwargs, env)
    if replicas < 1:
        raise EvaluationError("--replicas must be at least 1")
    return RayExecutor(model, engine_kwargs, replicas, address, env)


def timed_run(executor, requests: Sequence[Request], chunk_size: int, progress: Progress) -> tuple[list[Result], float]:
    t0 = time.perf_counter()
    results = executor.run(requests, chunk_size, progress)
    return results, time.perf_counter() - t0


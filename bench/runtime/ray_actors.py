"""The actors: a client actor hosts its virtual clients and trains them; the central actor
(ServerHost) holds the method's server, and RemoteServer is the runner's handle on it."""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np

from bench.api import ClientUpdate, Message
from bench.runtime.base import ClientJob, ClientResult, TaskData, pick_device, pin_threads, train_jobs
from bench.runtime.ray_cluster import forwarded_environ
from bench.runtime.ray_transport import RemotePayload, RemoteUpdate, put_once
from bench.wire import manifests

log = logging.getLogger(__name__)


class ClientActor:
    """Hosts the virtual clients assigned to it; built once per run."""

    def __init__(
        self,
        client_cls,
        config,
        env,
        train_x: np.ndarray,
        train_y: np.ndarray,
        threads: int,
        device: str,
        environ: dict[str, str],
        batched: bool = False,
    ) -> None:
        import ray
        import torch

        self.batched = batched
        os.environ.update(environ)
        pin_threads(max(1, threads))
        # Ray sets CUDA_VISIBLE_DEVICES to the granted GPU, so "cuda" is that one
        self.device = pick_device(device, bool(ray.get_gpu_ids()) and torch.cuda.is_available())
        self.client = client_cls(config, env)
        self.train_x, self.train_y = train_x, train_y  # zero-copy views into the object store
        self.data: TaskData | None = None

    def set_task(self, indices: dict[int, np.ndarray], noise: dict[int, tuple[float, int]] | None = None) -> None:
        self.data = None  # the last task's data leaves the device first
        self.data = TaskData(self.train_x, self.train_y, indices, self.device, noise)

    def describe(self) -> dict[str, Any]:
        import ray

        return {
            "pid": os.getpid(),
            "device": self.device,
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "node": ray.get_runtime_context().get_node_id(),
        }

    def train(self, jobs: list[ClientJob], array_refs: list[dict[str, Any]]) -> tuple:
        """This actor's jobs of a round in one call (called with num_returns = 1 + len(jobs)):
        the headers for the driver, then each update for the central actor. The payloads'
        arrays are fetched once for all the jobs that share them."""
        import ray

        unique = list({id(r): r for refs in array_refs for r in refs.values() if isinstance(r, ray.ObjectRef)}.values())
        fetched = dict(zip(map(id, unique), ray.get(unique))) if unique else {}
        payloads: dict[tuple, Message] = {}  # jobs given the same arrays share one payload (batched training groups by it)
        full = []
        for job, refs in zip(jobs, array_refs):
            key = (tuple((n, id(r)) for n, r in refs.items()), repr(job.payload.meta))
            if key not in payloads:
                # private copies: the object store's arrays are read-only and training reads them as tensors
                payloads[key] = Message({n: np.array(fetched.get(id(r), r)) for n, r in refs.items()}, job.payload.meta)
            full.append(dataclasses.replace(job, payload=payloads[key]))
        results = train_jobs(self.client, full, self.data, self.device, self.batched)
        headers = [
            ClientResult(RemoteUpdate(None, r.update.nbytes, r.update.num_samples, r.update.loss), r.seconds, kept=r.kept) for r in results
        ]
        return (headers, *(r.update for r in results))


class ServerHost:
    """The central actor: holds a method's server (an expert pool with its router and prompts,
    or a single parameter group), serves each client only
    what it needs straight from the object store, and aggregates what comes back."""

    def __init__(self, server_cls, config, env, environ: dict[str, str], threads: int | None = None) -> None:
        os.environ.update(environ)
        if threads:
            pin_threads(threads)
        self.server = server_cls(config, env)

    def call(self, hook: str, *args):
        return getattr(self.server, hook)(*args)

    def node(self) -> str:
        """The Ray node this actor runs on (pinned to the driver's)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def payloads(self, client_ids: list[int]) -> list[RemotePayload]:
        msgs = [self.server.payload_for(k) for k in client_ids]
        return [RemotePayload(refs, m.meta, m.nbytes, man) for m, refs, man in zip(msgs, put_once(msgs), manifests(m.arrays for m in msgs))]

    def aggregate(self, *updates: ClientUpdate) -> tuple[dict, dict]:
        """Aggregate straight from the client actors' outputs (passed as top-level references,
        so Ray hands them over resolved: large ones from the object store, small ones inline
        from the driver that owns them, with no borrowing round trips); the round's stats and
        aggregation report come back in the same answer (one call per round, not three)."""
        self.server.aggregate(list(updates))
        return self.server.stats(), self.server.aggregation_report()


class RemoteServer:
    """The runner's handle on the central actor (a ServerHandle): each hook is a call to the
    actor, none answered here."""

    def __init__(self, ray, server_cls, config, env, name: str | None = None, threads: int | None = None) -> None:
        self.ray = ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.actor = (
            ray.remote(ServerHost)
            .options(num_cpus=0, scheduling_strategy=here, name=name)
            .remote(server_cls, config, env, forwarded_environ(config, server_cls.worker_env), threads)
        )
        self._stats: dict | None = None  # the last aggregation's stats (until an evaluation may change them)
        self._report: dict | None = None  # and its aggregation report (until read)

    def _call(self, hook: str, *args):
        return self.ray.get(self.actor.call.remote(hook, *args))

    def setup(self) -> None:
        self._call("setup")

    def begin_task(self, task) -> None:
        self._call("begin_task", task)

    def rounds_for_task(self, configured: int, full_participation: bool) -> int:
        return self._call("rounds_for_task", configured, full_participation)

    def payload_for(self, client_id: int):
        return self.payloads_for([client_id])[0]

    def payloads_for(self, client_ids: list[int]) -> list[RemotePayload]:
        """One actor call for the round's sampled clients (never for clients not sampled)."""
        return self.ray.get(self.actor.payloads.remote(list(client_ids)))

    def aggregate(self, updates: list[RemoteUpdate]) -> None:
        self._stats, self._report = self.ray.get(self.actor.aggregate.remote(*[u.ref for u in updates]))

    def predict(self, x):
        self._stats = None  # a method may count what its evaluation saw (MoE-Adapter's DDAS share)
        return self._call("predict", np.asarray(x))

    def score(self, requests, kept):
        return self._call("score", requests, kept)

    def end_task(self) -> None:
        self._call("end_task")

    def stats(self):
        if self._stats is not None:  # as the aggregation left them, unless an evaluation came since
            return self._stats
        return self._call("stats")

    def aggregation_report(self):
        if self._report is not None:  # read once: the report covers the round since the last one
            report, self._report = self._report, None
            return report
        return self._call("aggregation_report")

    def extra_rows(self):
        return self._call("extra_rows")

    def state(self) -> bytes:
        return self._call("state")

    def load_state(self, blob: bytes) -> None:
        self._call("load_state", blob)

    def stop(self) -> None:
        self.ray.kill(self.actor)

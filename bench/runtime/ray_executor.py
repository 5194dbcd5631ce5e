"""The Ray executor: client actors on (fractional) GPUs, data put once, faults retried.

* The training features and labels are `ray.put` once per run; actors read them zero-copy
  from the object store and keep their own clients' slices between rounds (a sticky
  client -> actor assignment: client k lives on actor k mod n).
* A round's payload arrays are deduplicated by identity and put once each, so a shared
  payload (a shared head, projector or prompt bank) is stored once and passed by
  reference to every client, not copied per client.
* Each actor asks for `gpus_per_client` of a GPU and `cpus_per_client` CPUs (with
  `--gpus-per-client 0.25` four actors share a GPU) and sets torch's thread count to match.
  An actor granted a GPU fraction trains its clients on that GPU (`runtime.device=auto`)
  and keeps their data there for the whole task.
* The central actor runs on the driver's node (where the preflight checked the method's files
  and caches it reads), and every actor gets the driver's settings that matter to methods
  (API keys, the harness's FEDAME_/HF_ variables, the prefixes a method declares in
  `Server.worker_env`): on an existing cluster (`--address`) workers do not
  inherit the driver's environment. They travel as constructor arguments, not in a
  runtime_env the dashboard would display.
* Client updates go from the client actor to the central actor through the object store;
  the driver sees only a small header (sample count, loss, bytes) and the reference, so
  an update is never pulled into the driver and sent out again.
* A dead actor is replaced by a fresh one with the same constructor arguments and its
  clients' data; its in-flight client job is resubmitted, up to `max_retries` times, and
  each retry is counted in the rounds table. Results are identical because local_train is a pure function of
  (payload, data, context).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import uuid
from typing import Any

import numpy as np

from bench.api import Message
from bench.config import RuntimeConfig
from bench.errors import Diverged
from bench.runtime.base import ClientJob, ClientResult, DeviceUnavailable, Executor
from bench.runtime.ray_actors import ClientActor, RemoteServer
from bench.runtime.ray_cluster import RayUnavailable, ensure_ray, forwarded_environ
from bench.runtime.ray_metrics import progress_metrics
from bench.runtime.ray_transport import RemotePayload, put_once

log = logging.getLogger(__name__)


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, cfg: RuntimeConfig) -> None:
        self.cfg = cfg
        self.ray = ensure_ray(cfg)
        self.actors: list[Any] = []
        self.indices: dict[int, np.ndarray] = {}
        self.noise: dict[int, tuple[float, int]] = {}
        self._token = uuid.uuid4().hex[:4]
        self._restarts: dict[int, int] = {}
        self._worker_env: tuple[str, ...] = ()  # the method's env prefixes, known once make_server is called

    def actor_name(self, role: str) -> str | None:
        """e.g. `M a=0.5 s=0 client actor 3 [M-cifar100-a0.5-s0-1a2b3c4d5e #9f2c]` for a method M: the
        dashboard's Actors view reads as the sweep (the token keeps a rerun's names unique)."""
        lab = self.run_labels
        if not lab:
            return None
        return f"{lab['method']} a={lab['alpha']} s={lab['seed']} {role} [{lab['run_id']} #{self._token}]"

    def make_server(self, server_cls, config, env) -> RemoteServer:
        self._worker_env = server_cls.worker_env
        self.server = RemoteServer(self.ray, server_cls, config, env, self.actor_name("central actor"), self.cfg.torch_threads)
        return self.server

    def start(self, client_cls, config, env, train_x, train_y) -> None:
        ray = self.ray
        self.n = self._fitting_actors(self.cfg.num_actors or env.num_clients, env.num_clients)
        # features and labels go into the object store once; every actor reads them zero-copy
        self._ctor = (client_cls, config, env, ray.put(np.asarray(train_x)), ray.put(np.asarray(train_y)))
        self._environ = forwarded_environ(config, self._worker_env)
        self._reserve()
        self.actors = [self._new_actor(a) for a in range(self.n)]
        self.devices = self._check_devices()

    def _reserve(self) -> None:
        """Reserve all of this run's actors at once (a placement group, one bundle per actor).
        Runs of a sweep that share the cluster then wait for each other whole; placed actor
        by actor, two runs could each hold half the GPUs and wait for the other forever."""
        bundle = {k: v for k, v in (("CPU", self.cfg.cpus_per_client), ("GPU", self.cfg.gpus_per_client)) if v > 0}
        self.pg = None
        if bundle:  # actors that ask for nothing can always be placed
            from ray.util.placement_group import placement_group

            self.pg = placement_group([bundle] * self.n, strategy="PACK")
            self.ray.get(self.pg.ready())

    def _check_devices(self) -> list[dict[str, Any]]:
        """Wait for the actors to come up; say where their clients train."""
        from ray.exceptions import RayActorError

        try:
            info = self.ray.get([a.describe.remote() for a in self.actors])
        except RayActorError as e:
            if isinstance(e.__cause__, DeviceUnavailable) or "DeviceUnavailable" in str(e):
                self.stop()
                raise DeviceUnavailable(str(e.__cause__ or e).strip().splitlines()[-1]) from None
            raise
        devices = sorted({d["device"] for d in info})
        if self.cfg.gpus_per_client > 0 and devices == ["cpu"]:
            log.warning(
                "client actors hold %g of a GPU each but see no CUDA device (logical GPUs only?); they train on the CPU",
                self.cfg.gpus_per_client,
            )
        return info

    def _fitting_actors(self, wanted: int, clients: int) -> int:
        """As many actors as asked for, but no more than the cluster can hold at once (more
        would wait forever for resources while their clients' jobs wait on them)."""
        total = self.ray.cluster_resources()
        n = min(wanted, clients)
        for key, per in (("CPU", self.cfg.cpus_per_client), ("GPU", self.cfg.gpus_per_client)):
            if per > 0:
                fit = int(total.get(key, 0) // per)
                if fit < 1:
                    raise RayUnavailable(
                        f"the Ray cluster has {total.get(key, 0):g} {key}s, less than one client actor's "
                        f"{per:g}; lower --gpus-per-client / runtime.cpus_per_client or join a bigger cluster"
                    )
                n = min(n, fit)
        return n

    def _new_actor(self, a: int):
        """Actor `a`, in bundle `a` of the run's reservation."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        threads = self.cfg.torch_threads or (max(1, math.floor(self.cfg.cpus_per_client)) if self.cfg.cpus_per_client else 1)
        where = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=a) if self.pg else None
        return (
            self.ray.remote(ClientActor)
            .options(
                num_cpus=self.cfg.cpus_per_client,
                num_gpus=self.cfg.gpus_per_client,
                max_restarts=0,
                scheduling_strategy=where,
                name=self.actor_name(f"client actor {a}" + (f" restart {self._restarts[a]}" if self._restarts.get(a) else "")),
            )
            .remote(*self._ctor, threads, self.cfg.device, self._environ, self.cfg.batch_clients)
        )

    def actor_of(self, client_id: int) -> int:
        return client_id % self.n

    def _clients_of(self, a: int) -> tuple[dict[int, np.ndarray], dict[int, tuple[float, int]]]:
        """Actor `a`'s clients: their indices and (feature-noise skew) their noise."""
        mine = {k: ix for k, ix in self.indices.items() if self.actor_of(k) == a}
        return mine, {k: v for k, v in self.noise.items() if k in mine}

    def set_task(self, task: int, indices: tuple[np.ndarray, ...], noise: dict[int, tuple[float, int]] | None = None) -> None:
        self.indices, self.noise = dict(enumerate(indices)), noise or {}
        self.ray.get([actor.set_task.remote(*self._clients_of(a)) for a, actor in enumerate(self.actors)])

    def manifests(self, payloads) -> list:
        """Payloads the central actor served carry their manifests; the driver never sees their arrays."""
        return [p.manifest for p in payloads]

    def _put_arrays(self, jobs: list[ClientJob]) -> list[dict[str, Any]]:
        """Each job's name -> reference; payloads served by the central actor are stored already."""
        local = [j.payload for j in jobs if not isinstance(j.payload, RemotePayload)]
        refs = iter(put_once(local))
        return [j.payload.refs if isinstance(j.payload, RemotePayload) else next(refs) for j in jobs]

    def _submit(self, a: int, jobs: list[ClientJob], refs: list[dict[str, Any]]) -> list:
        """Actor `a`'s jobs of the round in one call: [headers ref, update ref per job]."""
        light = [dataclasses.replace(j, payload=Message({}, j.payload.meta)) for j in jobs]  # arrays travel as refs only
        return self.actors[a].train.options(num_returns=1 + len(jobs)).remote(light, refs)

    def train(self, jobs: list[ClientJob]) -> list[ClientResult]:
        """One call per actor per round (its clients' jobs together); an actor that dies is
        replaced and its jobs of the round are retried, each retry counted per job."""
        from ray.exceptions import RayActorError, RayTaskError

        refs = self._put_arrays(jobs)
        by_actor: dict[int, list[int]] = {}
        for i, j in enumerate(jobs):
            by_actor.setdefault(self.actor_of(j.client_id), []).append(i)
        futures = {a: self._submit(a, [jobs[i] for i in ix], [refs[i] for i in ix]) for a, ix in by_actor.items()}
        results: list[ClientResult | None] = [None] * len(jobs)
        for a, ix in by_actor.items():
            retries = 0
            while True:
                headers_ref, *update_refs = futures[a]
                try:
                    headers = self.ray.get(headers_ref)
                    break
                except RayTaskError as e:  # a client's own error: as the local executor raises it
                    if isinstance(e.cause, Diverged):
                        raise e.cause from None
                    raise
                except RayActorError as e:
                    retries += 1
                    clients = [jobs[i].client_id for i in ix]
                    if retries > self.cfg.max_retries:
                        raise RuntimeError(f"clients {clients} failed {retries} times: {e}") from e
                    log.warning(
                        "clients %s: actor failed (%s); restoring and retrying (%d/%d)",
                        clients,
                        type(e).__name__,
                        retries,
                        self.cfg.max_retries,
                    )
                    self._restore(a)
                    futures[a] = self._submit(a, [jobs[i] for i in ix], [refs[i] for i in ix])
            for i, res, update_ref in zip(ix, headers, update_refs):
                res.retries = retries
                res.update.ref = update_ref
                results[i] = res
        return results

    def _restore(self, a: int) -> None:
        """Replace a dead actor by a fresh one (same constructor arguments) holding the same
        clients' data; the driver keeps everything needed to rebuild it."""
        try:
            self.ray.kill(self.actors[a], no_restart=True)
        except Exception:  # already gone
            pass
        self._restarts[a] = self._restarts.get(a, 0) + 1
        self.actors[a] = self._new_actor(a)
        self.ray.get(self.actors[a].set_task.remote(*self._clients_of(a)), timeout=600)

    def round_done(self, method: str, row: dict) -> None:
        """Export progress to the Ray dashboard's metrics (ray.util.metrics)."""
        m = progress_metrics()
        tags = {"run_id": "", "alpha": "", "seed": "", **self.run_labels, "method": method}
        m["rounds"].inc(1, tags=tags)
        m["updates"].inc(row["clients_used"], tags=tags)
        if row["bytes_up"] + row["bytes_down"]:  # a Ray counter takes only positive increments
            m["bytes"].inc(row["bytes_up"] + row["bytes_down"], tags=tags)
        if row["retries"]:
            m["retries"].inc(row["retries"], tags=tags)
        if row["acc_seen"] is not None:
            m["accuracy"].set(row["acc_seen"], tags=tags)

    def stop(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if getattr(self, "pg", None) is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None
        if getattr(self, "server", None) is not None:
            self.server.stop()
            self.server = None

"""Scenario: class order, task split and per-task partition over clients (bench/data/partitions.py).

A pure function of (scenario config, labels, seed): the same inputs give the same indices
on every machine, so a Ray worker and a local run see identical client data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bench.config import ScenarioConfig
from bench.data.partitions import ScenarioError, partition
from bench.seeds import derive_seed


@dataclass(frozen=True)
class Scenario:
    class_order: tuple[int, ...]
    tasks: tuple[tuple[int, ...], ...]  # global label ids of each task's classes
    client_indices: tuple[tuple[np.ndarray, ...], ...]  # [task][client] -> train indices
    num_clients: int
    noise_std: tuple[float, ...] | None = None  # feature-noise skew: std of the Gaussian added to client k's inputs
    domain_order: tuple[int, ...] | None = None  # domain-incremental: the dataset's domain id of each task

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def seen_classes(self, task: int) -> tuple[int, ...]:
        return tuple(dict.fromkeys(c for t in self.tasks[: task + 1] for c in t))

    def new_classes(self, task: int) -> tuple[int, ...]:
        """The classes task `task` adds (all of its classes in a class-incremental scenario;
        after the first domain of a domain-incremental one, usually none)."""
        before = set(self.seen_classes(task - 1)) if task else set()
        return tuple(c for c in self.tasks[task] if c not in before)

    def test_tasks(self, test_y: np.ndarray, test_domain: np.ndarray | None) -> np.ndarray:
        """The task each test sample belongs to (-1: none): its class's task, or its domain's."""
        if self.domain_order is not None:
            of_domain = np.full(int(test_domain.max()) + 1 if len(test_domain) else 0, -1)
            of_domain[list(self.domain_order)] = np.arange(len(self.domain_order))
            return of_domain[test_domain]
        of_label = np.full(max(max(self.class_order), int(test_y.max(initial=0))) + 1, -1)  # -1: a class in no task
        for t, classes in enumerate(self.tasks):
            of_label[list(classes)] = t
        return of_label[test_y]

    def counts(self, labels: np.ndarray) -> np.ndarray:
        """Samples per (task, client): the --dry-run table."""
        return np.array([[len(ix) for ix in task] for task in self.client_indices])

    def client_classes(self, task: int, labels: np.ndarray) -> dict[int, tuple[int, ...]]:
        return {k: tuple(int(c) for c in np.unique(labels[ix])) for k, ix in enumerate(self.client_indices[task])}


def client_noise(scenario: Scenario, seed: int, task: int) -> dict[int, tuple[float, int]] | None:
    """Feature-noise skew: each client's noise std and the seed of its draw for this task."""
    if scenario.noise_std is None:
        return None
    return {k: (std, derive_seed(seed, "feature_noise", task, k)) for k, std in enumerate(scenario.noise_std)}


def resolve_class_order(cfg: ScenarioConfig, class_names: tuple[str, ...], seed: int) -> tuple[int, ...]:
    if cfg.class_order is not None:
        order = []
        for c in cfg.class_order:
            if isinstance(c, int):
                if not 0 <= c < len(class_names):
                    raise ScenarioError(f"scenario.class_order: label {c} is out of range 0..{len(class_names) - 1}")
                order.append(c)
            elif c in class_names:
                order.append(class_names.index(c))
            else:
                raise ScenarioError(f"scenario.class_order: unknown class {c!r}; known: {', '.join(class_names[:12])}...")
        if len(set(order)) != len(order):
            raise ScenarioError("scenario.class_order lists a class twice")
        return tuple(order)
    order = np.arange(len(class_names))
    if cfg.shuffle_classes:
        order = np.random.default_rng(derive_seed(seed, "class_order")).permutation(order)
    return tuple(int(c) for c in order)


def split_tasks(cfg: ScenarioConfig, order: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    if cfg.tasks is not None:
        sizes = list(cfg.tasks)
        if sum(sizes) != len(order):
            raise ScenarioError(
                f"task split {','.join(map(str, sizes))} covers {sum(sizes)} classes but the class order has "
                f"{len(order)}; make scenario.tasks sum to {len(order)}"
            )
    else:
        n = cfg.n_tasks or 1
        if n > len(order):
            raise ScenarioError(f"scenario.n_tasks={n} is more than the {len(order)} classes")
        sizes = [len(p) for p in np.array_split(np.arange(len(order)), n)]
    bounds = np.cumsum([0, *sizes])
    return tuple(tuple(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:]))


def domain_tasks(
    cfg: ScenarioConfig, order: tuple[int, ...], labels: np.ndarray, domains: np.ndarray | None, domain_names: tuple[str, ...] | None
) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """Domain-incremental: the domains in task order, and each task's classes (those present in
    its domain, in the class order)."""
    if domains is None or domain_names is None:
        raise ScenarioError(
            "scenario.tasks_by=domain needs a dataset with domains: data.dataset=imagefolder with "
            "data.domains=true and ROOT/<domain>/<class>/ folders"
        )
    names = cfg.domain_order or sorted(domain_names)
    unknown = [n for n in names if n not in domain_names]
    if unknown:
        raise ScenarioError(f"scenario.domain_order: unknown domains {unknown}; the data has {list(domain_names)}")
    ids = tuple(domain_names.index(n) for n in names)
    tasks = tuple(tuple(c for c in order if np.any((domains == d) & (labels == c))) for d in ids)
    return ids, tasks


def build_scenario(
    cfg: ScenarioConfig,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    seed: int,
    domains: np.ndarray | None = None,
    domain_names: tuple[str, ...] | None = None,
) -> Scenario:
    order = resolve_class_order(cfg, class_names, seed)
    domain_ids = None
    if cfg.tasks_by == "domain":
        domain_ids, tasks = domain_tasks(cfg, order, labels, domains, domain_names)
    else:
        tasks = split_tasks(cfg, order)
    per_task = []
    for t, classes in enumerate(tasks):
        mask = np.isin(labels, classes) if domain_ids is None else domains == domain_ids[t]
        idx = np.flatnonzero(mask)
        need = cfg.num_clients * max(1, cfg.min_samples if cfg.partition in ("dirichlet", "quantity") else 1)
        if len(idx) < need:
            raise ScenarioError(
                f"task {t} has {len(idx)} training samples, fewer than needed for {cfg.num_clients} clients "
                f"({need}); use fewer clients or more data"
            )
        rng = np.random.default_rng(derive_seed(seed, "partition", t))
        per_task.append(tuple(partition(cfg, labels, idx, rng)))
    noise = tuple(cfg.feature_noise * k / max(cfg.num_clients - 1, 1) for k in range(cfg.num_clients))
    return Scenario(order, tasks, tuple(per_task), cfg.num_clients, noise if cfg.feature_noise else None, domain_ids)

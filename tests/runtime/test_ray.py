"""The Ray executor on a real local cluster (loopback; head node: 2 CPUs, 2 logical GPUs;
multi-node tests add worker nodes). The dashboard runs (on loopback, a free port) because
its state API and the node's metrics endpoint are tested here."""

import os

import numpy as np
import pytest
import ray

from bench.data import load_dataset
from bench.features import FeatureStore
from bench.loader import load_config, method_config
from bench.runner import RunSpec, execute_run
from bench.runtime import LocalExecutor
from bench.runtime.ray_executor import RayExecutor


def smoke(method, tmp_path, *overrides):
    cfg = load_config("smoke", ["runtime.cpus_per_client=0", "runtime.gpus_per_client=0.5", "runtime.num_actors=2", *overrides])
    ds = load_dataset(cfg.data, None)
    store = FeatureStore(ds, cfg.backbone, tmp_path)
    return RunSpec(method, cfg), ds, store


def run(spec, ds, store, executor, tmp_path, on_round=None):
    return execute_run(spec, ds, store, executor, str(tmp_path), on_round=on_round)


def matrix(out):
    return [(r["after_task"], r["eval_task"], r["accuracy"]) for r in out.tables["accuracy"]]


def all_gpus_free(timeout: float = 30.0) -> bool:
    """Whether the cluster's 2 logical GPUs are all free again (released asynchronously)."""
    import time

    deadline = time.monotonic() + timeout
    while ray.available_resources().get("GPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    return ray.available_resources().get("GPU", 0) == 2


def test_fractional_gpus_place_four_clients_at_once(cluster, tmp_path):
    spec, ds, store = smoke("fedavg", tmp_path, "scenario.num_clients=4", "runtime.num_actors=4")
    ex = RayExecutor(spec.config.runtime)
    from bench.api import MethodEnv
    from bench.runner import method_env

    env: MethodEnv = method_env(spec.config, ds, 512, str(tmp_path))
    from baselines.fedavg import FedAvg

    ex.start(FedAvg.ClientClass, method_config(spec.config, "fedavg"), env, store.features("train"), ds.train_y)
    try:
        assert len({d["pid"] for d in ex.devices}) == 4  # four live actor processes ...
        assert all(len(d["gpu_ids"]) == 1 and d["device"] == "cpu" for d in ex.devices)  # logical GPUs: no CUDA here
        assert ray.available_resources().get("GPU", 0) == 0  # ... holding 4 x 0.5 of the 2 logical GPUs
    finally:
        ex.stop()


@pytest.mark.parametrize("method", ["fedavg", "fedame"])
def test_ray_reproduces_local_accuracy_matrix(cluster, tmp_path, method):
    spec, ds, store = smoke(method, tmp_path)
    local = run(spec, ds, store, LocalExecutor(), tmp_path)
    remote = run(spec, ds, store, RayExecutor(spec.config.runtime), tmp_path)
    assert matrix(local) == matrix(remote)
    assert local.summary["bytes_up"] == remote.summary["bytes_up"]
    assert local.summary["bytes_down"] == remote.summary["bytes_down"]  # manifests from the central actor


def test_a_client_that_diverges_on_an_actor_is_the_same_one_line_error_as_locally(cluster, tmp_path):
    from bench.errors import Diverged

    spec, ds, store = smoke("fedavg", tmp_path, "training.lr=1e38")
    with pytest.raises(Diverged) as local:
        run(spec, ds, store, LocalExecutor(), tmp_path)
    with pytest.raises(Diverged) as remote:
        run(spec, ds, store, RayExecutor(spec.config.runtime), tmp_path)
    assert str(remote.value) == str(local.value) and "lower training.lr" in str(local.value)


def test_ray_reproduces_an_attacked_run_and_its_aggregation_shares(cluster, tmp_path):
    # one thread count everywhere, so the updates (not only the accuracies) agree to the bit
    spec, ds, store = smoke("fedame", tmp_path, "scenario.attack.kind=sign_flip", "aggregation.rule=attention", "runtime.torch_threads=1")
    local = run(spec, ds, store, LocalExecutor(spec.config.runtime), tmp_path)
    remote = run(spec, ds, store, RayExecutor(spec.config.runtime), tmp_path)
    assert matrix(local) == matrix(remote)
    shares = [[r["agg_shares"], r["malicious_share"]] for r in local.tables["rounds"]]
    assert shares == [[r["agg_shares"], r["malicious_share"]] for r in remote.tables["rounds"]]
    assert all(s is not None for _, s in shares)


def test_killed_actor_is_recovered_with_identical_results(cluster, tmp_path):
    spec, ds, store = smoke("fedavg", tmp_path)
    local = run(spec, ds, store, LocalExecutor(), tmp_path)
    ex = RayExecutor(spec.config.runtime)
    killed = []

    def kill_once(row):
        if row["task"] == 1 and row["round"] == 0 and not killed:
            ray.kill(ex.actors[0])  # the actor dies mid-run
            killed.append(True)

    remote = run(spec, ds, store, ex, tmp_path, on_round=kill_once)
    assert killed
    assert matrix(remote) == matrix(local)
    assert sum(r["retries"] for r in remote.tables["rounds"]) >= 1  # the retry is on record
    rounds = [(r["task"], r["round"]) for r in remote.tables["rounds"]]
    assert len(rounds) == len(set(rounds)) == len(local.tables["rounds"])  # nothing lost or duplicated


def test_a_run_interrupted_under_ray_resumes_from_its_checkpoint_with_the_same_numbers(cluster, tmp_path):
    """The central actor's server state goes into the checkpoint and into a fresh central actor."""
    from bench.checkpoint import CheckpointStore

    spec, ds, store = smoke("fedame", tmp_path)
    whole = run(spec, ds, store, LocalExecutor(), tmp_path)
    checkpoints = CheckpointStore(tmp_path / "out")

    class Interrupted(Exception):
        pass

    def stop_after_task_1(server, task, *_):
        if task == 1:
            raise Interrupted

    with pytest.raises(Interrupted):
        execute_run(
            spec,
            ds,
            store,
            RayExecutor(spec.config.runtime),
            str(tmp_path),
            on_task_end=stop_after_task_1,
            save_checkpoint=checkpoints.save,
        )
    ckpt = checkpoints.load(spec.run_id)  # task 0's checkpoint, read back from disk
    assert ckpt.next_task == 1 and len(ckpt.progress.rounds_rows) == spec.config.training.rounds
    resumed = execute_run(spec, ds, store, RayExecutor(spec.config.runtime), str(tmp_path), resume=ckpt)
    assert matrix(resumed) == matrix(whole)
    assert resumed.summary["bytes_down"] == whole.summary["bytes_down"]  # the wire ledger went on where it was

    def decided(out):
        return [{k: v for k, v in d.items() if k != "latency_s"} for d in out.tables["decisions"]]

    assert decided(resumed) == decided(whole) and decided(whole)  # task 0's decisions came back from the checkpoint
    assert resumed.tables["runs"][0]["resumed_at_task"] == 1


def test_client_actors_batch_their_clients_like_the_local_executor(cluster, tmp_path):
    """runtime.batch_clients under Ray: each actor trains its clients of the round together."""
    spec, ds, store = smoke("fedprox", tmp_path, "runtime.batch_clients=true", "scenario.num_clients=4", "runtime.num_actors=2")
    local = run(spec, ds, store, LocalExecutor(spec.config.runtime), tmp_path)  # all 4 clients in one batch
    remote = run(spec, ds, store, RayExecutor(spec.config.runtime), tmp_path)  # 2 clients per actor
    np.testing.assert_allclose([a for *_, a in matrix(remote)], [a for *_, a in matrix(local)], atol=1 / 40)
    np.testing.assert_allclose([r["loss"] for r in remote.tables["rounds"]], [r["loss"] for r in local.tables["rounds"]], atol=1e-5)


def test_failing_run_does_not_stop_the_sweep(cluster, tmp_path):
    from baselines.head import HeadServer
    from bench.api import register
    from bench.results import ResultWriter, read_table
    from bench.sweep import expand, prepare, run_sweep

    @register
    class Exploding(HeadServer):  # its clients are FedAvg's; its server fails in round 2
        name = "exploding"
        summary = "test-only: fails mid-run"

        def aggregate(self, updates):
            super().aggregate(updates)
            raise RuntimeError("simulated crash")

    cfg = load_config(
        "smoke",
        [
            "runtime.executor=ray",
            "runtime.cpus_per_client=0",
            "runtime.gpus_per_client=0.5",
            "runtime.num_actors=1",
            "runtime.max_concurrent_runs=2",
        ],
    )  # two runs share the cluster
    specs = expand(cfg, ["fedavg", "exploding", "fedncm"], [0.5], [0])
    writer = ResultWriter(tmp_path / "out")
    try:
        done = run_sweep(specs, prepare(cfg, specs, None), writer)
    finally:
        from bench import api

        api._REGISTRY.pop("exploding", None)  # keep the test-only method out of later tests
    runs = {r["method"]: r for r in read_table(tmp_path / "out", "runs").to_pylist()}
    assert len(done) == 2
    assert runs["fedavg"]["status"] == runs["fedncm"]["status"] == "completed"
    assert runs["exploding"]["status"] == "failed" and "simulated crash" in runs["exploding"]["error"]
    assert not writer.is_complete(specs[1].run_id)  # a rerun will try it again


def test_central_actor_serves_each_client_its_own_arrays(cluster, tmp_path):
    """Per-client payload arrays (FedAME's held experts) must map to the right objects."""
    from bench.api import TaskInfo
    from bench.runner import method_env
    from bench.runtime.ray_actors import ServerHost
    from fedame.method import FedAME

    spec, ds, store = smoke("fedame", tmp_path)
    env = method_env(spec.config, ds, 512, str(tmp_path))
    host = ServerHost(FedAME, method_config(spec.config, "fedame"), env, {})
    host.call("setup")
    host.call("begin_task", TaskInfo(0, (0, 1, 2, 3), (0, 1, 2, 3), {0: (0,), 1: (1, 3), 2: (0, 1, 2, 3)}))
    served = host.payloads([0, 1, 2])
    for k, remote in enumerate(served):
        local = host.server.payload_for(k)
        assert set(remote.refs) == set(local.arrays)
        for name, ref in remote.refs.items():  # small arrays travel inline, the others through the object store
            np.testing.assert_array_equal(ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref, local.arrays[name])
        assert remote.nbytes == local.nbytes
    assert served[0].nbytes < served[2].nbytes  # client 0 holds fewer experts
    kinds = {type(r).__name__ for p in served for r in p.refs.values()}
    assert kinds == {"ObjectRef", "ndarray"}  # both paths are exercised here


def test_cuda_requested_on_logical_gpus_fails_clearly(cluster, tmp_path):
    """Actors granted a (logical) GPU that CUDA cannot see refuse runtime.device=cuda with
    one clear error, and give their GPU fractions back."""

    from bench.runtime.base import DeviceUnavailable

    spec, ds, store = smoke("fedavg", tmp_path, "runtime.device=cuda")
    with pytest.raises(DeviceUnavailable, match="runtime.device=auto or cpu"):
        run(spec, ds, store, RayExecutor(spec.config.runtime), tmp_path)
    assert all_gpus_free()


@pytest.fixture
def busy_core():
    """A second process spinning on a core for the test's length: the CI machine under load."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield
    proc.kill()
    proc.wait()


# Where the SIGINT lands: a line of the sweep's output (plain mode: not a terminal), or the
# first finished run's row on disk.
CTRL_C_POINTS = [
    ("before the first run", "sweep smoke"),
    ("while actors start", ": starting"),
    ("mid-run", "task 0 done"),
    ("between runs", "runs/*.parquet"),
]


def as_in_a_terminal() -> None:
    """The sweep's SIGINT disposition as a terminal's foreground job has it. A job started in
    the background of a non-interactive shell (`cmd &`, as CI runners and nohup start test
    suites) inherits SIGINT ignored, and so would the sweep: a real Ctrl-C never reaches it,
    which is what POSIX intends for such jobs and what made this test fail in such runs."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    "points",
    [CTRL_C_POINTS[2:], CTRL_C_POINTS[1:2], CTRL_C_POINTS[:1]],
    ids=["mid-run-between-runs", "while-actors-start", "before-the-first-run"],
)
def test_ctrl_c_under_ray_stops_at_every_point_and_the_rerun_finishes(cluster, tmp_path, busy_core, points):
    """The CLI joins this test's cluster with --address and runs two runs at a time, under
    load. A real SIGINT sent before the first run, while actors start, mid-run and between
    runs (one interrupted sweep each, into one folder) always stops it: exit 130, completed
    runs kept once each, no actor left holding a GPU. The same command then does exactly the
    runs still missing."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    from bench.results import read_table

    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "bench",
        "run",
        "--config",
        "smoke",
        "--methods",
        "fedncm,fedavg,fedprox,fedlwf",
        "--executor",
        "ray",
        "--address",
        ray.get_runtime_context().gcs_address,
        "--concurrent-runs",
        "2",
        "--set",
        "training.rounds=15",
        "--set",
        "runtime.cpus_per_client=0",
        "--set",
        "runtime.gpus_per_client=0.5",
        "--set",
        "runtime.num_actors=1",
        "--out",
        str(out),
    ]

    def done_methods() -> list[str]:
        return sorted(r["method"] for r in read_table(out, "runs").to_pylist()) if (out / "runs").exists() else []

    for point, marker in points:
        if len(done_methods()) == 4:
            break
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=as_in_a_terminal)
        lines: list[str] = []
        reader = threading.Thread(target=lambda lines=lines, proc=proc: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        before = len(done_methods())
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if marker.endswith(".parquet"):
                if len(done_methods()) > before:
                    break
            elif any(marker in line for line in lines):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"{point}: the sweep ended before the signal\n{''.join(lines)}"
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=180)
        reader.join(timeout=10)
        output = "".join(lines)
        assert proc.returncode == 130, f"{point}: exit {proc.returncode}\n{output}"
        assert "interrupted" in output, output
        methods = done_methods()
        assert len(methods) == len(set(methods)) < 4, f"{point}: {methods}\n{output}"
        assert all_gpus_free(), point  # the interrupted driver's actors are gone

    missing = 4 - len(done_methods())
    rerun = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout
    assert f"{missing} runs completed now" in " ".join(rerun.stdout.split()), rerun.stdout
    runs = read_table(out, "runs").to_pylist()
    assert sorted(r["method"] for r in runs) == ["fedavg", "fedlwf", "fedncm", "fedprox"]
    assert all(r["status"] == "completed" for r in runs)


def test_runtime_benchmark_measures_both_executors(cluster):
    """bench-runtime on a tiny workload: every figure is measured and consistent."""
    from baselines.runtime_study import run_benchmark

    rows = run_benchmark([2], clients=4, rounds=3, hidden=32, per_class=30)
    assert [r["executor"] for r in rows] == ["local", "ray x2"]
    for r in rows:
        assert 0 < r["critical_s"] <= r["client_compute_s"] + 1e-9
        # two measured rounds, so medians are means: wall = critical path + overhead
        assert r["critical_s"] + r["overhead_ms"] / 1000 == pytest.approx(r["s_per_round"])
        assert 0 <= r["server_ms"] <= r["overhead_ms"] + 1e-6
        assert r["bytes_per_round"] > 0 and r["gpu_util_pct"] is None  # no NVIDIA GPU here
    assert rows[0]["critical_s"] == rows[0]["client_compute_s"]  # local: one worker runs every client


def test_llm_key_set_after_the_cluster_started_reaches_the_central_actor(cluster, tmp_path, monkeypatch):
    """Workers do not inherit the driver's environment when it joins an existing cluster;
    here the key is set after the cluster started, so only forwarding can deliver it."""
    from bench.results import ResultWriter, read_table
    from bench.sweep import expand, prepare, run_sweep
    from tests.llm_server import FakeLLM

    monkeypatch.setenv("FEDAME_RAY_TEST_LLM", "sk-local")  # named by the config, not by a prefix rule alone
    monkeypatch.setenv("FEDAME_CACHE_DIR", str(tmp_path / "cache"))  # no decisions cached by earlier tests
    with FakeLLM() as server:
        server.answer = {"action": "new_expert", "expert": None, "reason": "each class alone"}
        cfg = load_config(
            "smoke",
            [
                "runtime.executor=ray",
                "runtime.cpus_per_client=0",
                "runtime.gpus_per_client=0.5",
                "runtime.num_actors=2",
                f"methods.fedame.llm.base_url={server.base_url}",
                "methods.fedame.llm.api_key_env=FEDAME_RAY_TEST_LLM",
                "methods.fedame.llm.max_retries=0",
            ],
        )
        specs = expand(cfg, ["fedame"], [0.5], [0])
        run_sweep(specs, prepare(cfg, specs, None), ResultWriter(tmp_path / "out"))
        assert len(server.requests) == 6
    assert {d["source"] for d in read_table(tmp_path / "out", "decisions").to_pylist()} == {"llm"}


def test_concurrent_runs_that_each_fill_the_cluster_take_turns(cluster, tmp_path):
    """Two runs of four 0.5-GPU actors on 2 logical GPUs: each needs the whole cluster, so
    one must wait for the other whole (reserved all at once), never half-placed."""
    from bench.results import ResultWriter, read_table
    from bench.sweep import expand, prepare, run_sweep

    cfg = load_config(
        "smoke",
        [
            "runtime.executor=ray",
            "runtime.cpus_per_client=0",
            "runtime.gpus_per_client=0.5",
            "scenario.num_clients=4",
            "runtime.num_actors=4",
            "runtime.max_concurrent_runs=2",
        ],
    )
    specs = expand(cfg, ["fedavg", "fedprox"], [0.5], [0])
    done = run_sweep(specs, prepare(cfg, specs, None), ResultWriter(tmp_path / "out"))
    assert len(done) == 2
    assert {r["status"] for r in read_table(tmp_path / "out", "runs").to_pylist()} == {"completed"}
    assert all_gpus_free()  # reservations released


def test_setup_failure_releases_the_central_actor(cluster, tmp_path):
    from ray._private.state import actors as actor_table

    def live_server_hosts() -> int:
        return sum(a["State"] == "ALIVE" and a["ActorClassName"].endswith("ServerHost") for a in actor_table().values())

    before = live_server_hosts()
    spec, ds, store = smoke("fedame", tmp_path, "methods.fedame.anchors.source=file", "methods.fedame.anchors.file=/no/such.npz")
    ex = RayExecutor(spec.config.runtime)  # held, as the sweep holds it while it records the failure
    with pytest.raises(Exception, match="no file"):  # FedAME's setup raises inside the central actor
        run(spec, ds, store, ex, tmp_path)
    import time

    deadline = time.monotonic() + 30
    while live_server_hosts() > before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_server_hosts() == before  # the central actor was killed, not left behind
    assert all_gpus_free()  # and no client actor or reservation holds a GPU


def test_actors_are_named_after_their_run_and_role(cluster, tmp_path):
    from ray.util.state import list_actors  # Ray's state API: what the dashboard's Actors view shows

    spec, ds, store = smoke("fedavg", tmp_path)
    seen: set[str] = set()

    def look(row):
        if row["task"] == 0 and row["round"] == 0:
            seen.update(a.name for a in list_actors(filters=[("state", "=", "ALIVE")]) if a.name)

    run(spec, ds, store, RayExecutor(spec.config.runtime), tmp_path, on_round=look)
    for role in ("central actor", "client actor 0", "client actor 1"):
        assert any(n.startswith(f"fedavg a=0.5 s=0 {role} [{spec.run_id} #") for n in seen), (role, seen)


def test_progress_metrics_reach_the_nodes_metrics_endpoint_labelled_by_run(cluster, tmp_path):
    """Scrape the node's Prometheus endpoint (what Ray's Prometheus/Grafana integration reads)
    and find this run's counters under its own labels."""
    import re
    import time
    import urllib.request

    spec, ds, store = smoke("fedavg", tmp_path, "seed=7")  # a run id no other test in the module uses
    out = run(spec, ds, store, RayExecutor(spec.config.runtime), tmp_path)
    labels = f'alpha="0.5",method="fedavg",.*run_id="{spec.run_id}",seed="7"'
    want = {
        "ray_fedame_rounds_completed_total": len(out.tables["rounds"]),
        "ray_fedame_client_updates_total": sum(r["clients_used"] for r in out.tables["rounds"]),
    }
    ports = {n["MetricsExportPort"] for n in ray.nodes() if n["Alive"]}
    found: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while found != want and time.monotonic() < deadline:
        text = "".join(urllib.request.urlopen(f"http://127.0.0.1:{p}/metrics", timeout=5).read().decode() for p in ports)
        for name in want:
            hits = [float(v) for v in re.findall(rf"^{name}{{[^}}]*{labels}[^}}]*}} (\S+)$", text, re.M)]
            found[name] = sum(hits) if hits else None
        time.sleep(0.5)
    assert found == want
    assert re.search(rf"^ray_fedame_acc_seen{{[^}}]*{labels}[^}}]*}} 0\.\d+$", text, re.M)  # the latest accuracy gauge


SHARED = __import__("pathlib").Path(__file__).resolve().parents[3] / "shared"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data" / "cifar-100-python").exists(), reason="../shared/data absent")
@pytest.mark.parametrize("method", ["fedavg", "fedame"])
def test_one_thread_count_makes_local_and_ray_identical_on_real_data(cluster, method):
    """The main job's setting on the real CIFAR-100 features (one round per task to keep it
    short): with `runtime.torch_threads` the same everywhere, local and Ray agree exactly."""
    from pathlib import Path

    from bench.sweep import default_cache_dir

    root = Path(__file__).resolve().parents[2]
    over = [
        "runtime.torch_threads=1",
        "runtime.cpus_per_client=0",
        "runtime.gpus_per_client=0.5",
        "runtime.num_actors=2",
        "training.rounds=1",
        "eval.every=1",
    ]
    cfg = load_config(
        str(root / "configs" / "cifar100_local.yaml"),
        [
            *over,
            f"data.root={SHARED / 'data'}",
            f"backbone.weights={SHARED / 'weights' / 'resnet18_cifar100_b50.pt'}",
            f"methods.fedame.anchors.file={SHARED / 'data' / 'anchors' / 'cifar100_clip_vit-b-32.npz'}",
        ],
    )
    ds = load_dataset(cfg.data, Path(cfg.data.root))
    cache = default_cache_dir(cfg)
    store = FeatureStore(ds, cfg.backbone, cache)
    spec = RunSpec(method, cfg)
    local = execute_run(spec, ds, store, LocalExecutor(cfg.runtime), str(cache))
    remote = execute_run(spec, ds, store, RayExecutor(cfg.runtime), str(cache))
    assert matrix(local) == matrix(remote)
    assert local.summary["final_acc"] > 0.1  # real learning (chance: 1%), not a degenerate agreement


def test_runs_across_nodes_and_survives_losing_one(cluster, tmp_path):
    """Two worker nodes with one logical GPU each and a spare: the run's two actors land on
    different nodes (the head's GPUs are held by another reservation), the central actor on
    the driver's node; one node is removed mid-run, its bundle and actor move to the spare,
    and the run completes with the local numbers and every round once."""
    from ray.util.placement_group import placement_group, remove_placement_group

    spec, ds, store = smoke("fedavg", tmp_path, "runtime.gpus_per_client=1", "runtime.num_actors=2")
    local = run(spec, ds, store, LocalExecutor(), tmp_path)
    head_gpus = placement_group([{"GPU": 2}], strategy="STRICT_PACK")  # keeps the run off the head
    ray.get(head_gpus.ready())
    nodes = [cluster.add_node(num_cpus=0, num_gpus=1, node_ip_address="127.0.0.1") for _ in range(3)]
    try:
        ex = RayExecutor(spec.config.runtime)
        placed, removed = {}, []

        def lose_a_node(row):
            if row["task"] == 1 and row["round"] == 0 and not removed:
                where = [d["node"] for d in ray.get([a.describe.remote() for a in ex.actors])]
                placed.update(actors=where, central=ray.get(ex.server.actor.node.remote()))
                victim = next(n for n in nodes if n.node_id == where[0])
                cluster.remove_node(victim)
                removed.append(victim)

        remote = run(spec, ds, store, ex, tmp_path, on_round=lose_a_node)
        assert removed and len(set(placed["actors"])) == 2  # one actor per worker node
        assert placed["central"] == ray.get_runtime_context().get_node_id()
        assert matrix(remote) == matrix(local)
        rounds = [(r["task"], r["round"]) for r in remote.tables["rounds"]]
        assert len(rounds) == len(set(rounds)) == len(local.tables["rounds"])
        assert sum(r["retries"] for r in remote.tables["rounds"]) >= 1
    finally:
        remove_placement_group(head_gpus)
        for n in nodes:
            if n not in removed:
                cluster.remove_node(n)


def test_a_second_sweep_joins_the_running_cluster_with_address(cluster, tmp_path):
    """Another process (a second sweep) joins this cluster through --address and finishes."""
    import subprocess
    import sys

    out = tmp_path / "joined"
    argv = [
        sys.executable,
        "-m",
        "bench",
        "run",
        "--config",
        "smoke",
        "--methods",
        "fedavg",
        "--executor",
        "ray",
        "--address",
        cluster.address,
        "--set",
        "runtime.cpus_per_client=0",
        "--set",
        "runtime.gpus_per_client=0.5",
        "--out",
        str(out),
    ]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    said = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 0, said[-2000:]
    assert "1 runs completed now" in said and "'GPU': 2.0" in said  # it ran on this cluster's two logical GPUs
    assert len(list((out / "summary").glob("*.parquet"))) == 1


def test_the_dashboard_token_is_located_where_ray_reads_it(tmp_path):
    from bench.runtime.ray_cluster import token_location

    assert "$RAY_AUTH_TOKEN" in token_location({"RAY_AUTH_TOKEN": "t", "RAY_AUTH_TOKEN_PATH": "/x"})  # Ray's order
    assert "/x/token (`ray get-auth-token` prints it)" in token_location({"RAY_AUTH_TOKEN_PATH": "/x/token"})
    assert token_location({}).endswith(f"{os.path.expanduser('~')}/.ray/auth_token (`ray get-auth-token` prints it)")

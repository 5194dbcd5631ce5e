"""What each personalised method claims, checked on its own part: the switch changes what it
says it changes, and the result is carried by that part."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from baselines.pfl.common import personal_of
from baselines.pfl.model import initial_state
from baselines.pfl.mutual import DETConfig
from baselines.pfl.pfa import low_band, merged, spectrum
from bench.api import get_method
from bench.runner import RunLoop
from bench.tracks.personalized import Personalized
from tests.conftest import numbers
from tests.personalized.conftest import FAST, pfl_cfg, run_pfl


def servers_after(method: str, pfl_data, *overrides: str):
    """The run's server after its last round, what each client kept, and the run's output."""
    seen, kept = {}, {}
    train_clients = RunLoop.train_clients

    def spy(self, clients, t, r):
        out = train_clients(self, clients, t, r)
        kept.update(self.progress.kept)
        return out

    def grab(server, t, track, train_x, test_x):
        seen["server"] = server

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(RunLoop, "train_clients", spy)
        _, out = run_pfl(method, pfl_data, *FAST, *overrides, on_task_end=grab)
    return seen["server"], kept, out


def test_fedper_shares_the_base_and_keeps_each_head(pfl_data):
    server, kept, _ = servers_after("fedper", pfl_data)
    received = [server.view("received", kept[k], k) for k in sorted(kept)]
    base = [k for k in received[0] if k.startswith("base.")]
    assert all(np.array_equal(r[k], server.glob[k]) for r in received for k in base)
    heads = [r["head.weight"] for r in received]
    assert not np.array_equal(heads[0], heads[1])  # each its own
    assert all(np.array_equal(r["head.weight"], personal_of(kept[k])["head.weight"]) for r, k in zip(received, sorted(kept)))


def test_fedavg_deploys_the_global_model_and_fine_tuning_a_personal_one(pfl_data):
    server, kept, _ = servers_after("fedavg_pfl", pfl_data)
    k = sorted(kept)[0]
    assert all(np.array_equal(v, server.glob[n]) for n, v in server.view("deployed", kept[k], k).items())
    server, kept, _ = servers_after("fedavg_ft", pfl_data)
    deployed = server.view("deployed", kept[k], k)
    assert not np.array_equal(deployed["head.weight"], server.glob["head.weight"])


def test_dittos_lambda_pulls_the_personal_model_to_the_global_one(pfl_data):
    """One round: every personal model is trained with a pull toward the initial global model."""

    def gap(lam: float) -> float:
        server, kept, _ = servers_after("ditto", pfl_data, f"methods.ditto.lam={lam}", "training.rounds=1", "training.local_epochs=5")
        start = initial_state(server.config, server.env)["head.weight"]
        return float(np.mean([np.linalg.norm(personal_of(kept[k])["head.weight"] - start) for k in kept]))

    assert gap(10.0) < 0.3 * gap(0.0)


def test_pfa_keeps_a_model_whose_own_spectrum_is_averaged():
    rng = np.random.default_rng(0)
    for key, w in (
        ("base.0.weight", rng.normal(size=(8, 6))),
        ("head.weight", rng.normal(size=(5, 8))),
        ("base.0.bias", rng.normal(size=7)),
    ):
        f = spectrum(key, w)
        for band in (0.2, 0.6, 1.0):
            assert np.allclose(merged(key, w.astype(np.float32), np.abs(f), np.angle(f), band), w, atol=1e-5)


def test_pfa_with_the_whole_band_gives_every_client_one_model_and_a_narrow_band_does_not(pfl_data):
    def received(band: float):
        server, kept, _ = servers_after("pfa", pfl_data, f"methods.pfa.band_start={band}", f"methods.pfa.band_end={band}")
        return [server.view("received", kept[k], k)["base.0.weight"] for k in sorted(kept)]

    whole, narrow = received(1.0), received(0.1)
    assert all(np.allclose(r, whole[0], atol=1e-5) for r in whole)
    assert not np.allclose(narrow[0], narrow[1], atol=1e-3)


def test_pfa_dets_deputy_arrives_as_the_federations_low_band_over_the_personal_high_frequencies(pfl_data):
    """PFA + DET: the personal model P is kept (received view); the deputy takes PFA's averaged
    low band and P's own high frequencies, not FedAvg's global model as DET's deputy does."""
    server, kept, out = servers_after("pfa_det", pfl_data, "methods.pfa_det.band_start=0.3", "methods.pfa_det.band_end=0.3")
    key, glob = "base.0.weight", server.payload_for(0).arrays
    for k in sorted(kept):
        p, deputy = personal_of(kept[k])[key], server.view("arriving", kept[k], k)[key]
        assert np.array_equal(server.view("received", kept[k], k)[key], p)
        f_dep, f_p = spectrum(key, deputy), spectrum(key, p)
        low = low_band(f_p.shape, (0, 1), 0.3)
        assert 0 < low.sum() < low.size
        assert np.allclose(f_dep[~low], f_p[~low], atol=1e-3)  # its own high frequencies
        target = glob["amp." + key] * np.exp(1j * glob["phase." + key])
        assert np.allclose(f_dep[low], target[low], atol=1e-3)  # the federation's low band
        assert not np.allclose(deputy, p, atol=1e-3)
    assert out.summary["retrogress"] == 0.0  # P is never overwritten
    stats = [json.loads(r["stats"]) for r in out.tables["rounds"]]
    assert all(abs(sum(s[f"det_{p}"] for p in ("recover", "exchange", "sublimate")) - 1) < 1e-9 for s in stats)


def test_det_orders_its_thresholds_and_reports_its_phases(pfl_data):
    with pytest.raises(ValidationError, match="l1 < l2"):
        DETConfig(l1=0.9, l2=0.5)
    _, out = run_pfl("det", pfl_data, *FAST)
    stats = [json.loads(r["stats"]) for r in out.tables["rounds"]]
    assert all(abs(sum(s[f"det_{p}"] for p in ("recover", "exchange", "sublimate")) - 1) < 1e-9 for s in stats)


def test_cpa_without_its_alignment_is_det(pfl_data):
    """CPA's only difference from DET is its prototype term: at lam 0 the numbers are DET's."""
    _, det = run_pfl("det", pfl_data, *FAST)
    _, cpa0 = run_pfl("cpa", pfl_data, *FAST, "methods.cpa.lam=0")
    _, cpa = run_pfl("cpa", pfl_data, *FAST, "methods.cpa.lam=100")

    def accs(out):
        return [r["test_acc"] for r in numbers(out)["clients"]]

    assert accs(cpa0) == accs(det) and accs(cpa) != accs(det)


def test_cpa_weights_rare_classes_more(pfl_data):
    """Long-tailed training data (class 0 ten times class 5): each class's pull to its prototype
    is inversely proportional to how many samples of it the clients hold, with mean 1."""
    server, kept, _ = servers_after("cpa", pfl_data, "scenario.imbalance=10")
    track = Personalized(pfl_cfg("scenario.imbalance=10"), pfl_data[0], pfl_data[0].test_x)
    held = np.bincount(np.concatenate([pfl_data[0].train_y[track.splits.train[k]] for k in track.training_clients]), minlength=6)
    w = server.proto_weight
    assert w is not None and server.proto is not None and held[0] > 5 * held[5]
    assert np.allclose(w * held, (w * held)[0], rtol=1e-5) and np.isclose(w.mean(), 1.0)


def test_the_cnn_trains_on_images(pfl_data):
    cls = get_method("fedavg_pfl")
    assert cls.input_for(cls.Config(model="cnn")) == "images"
    _, out = run_pfl("fedavg_pfl", pfl_data, *FAST, "methods.fedavg_pfl.model=cnn", "methods.fedavg_pfl.hidden=32")
    assert out.tables["rounds"][0]["bytes_up"] > 4 * (32 * 3 * 25 + 64 * 32 * 25)  # the convolutions travel


def test_attention_trusts_a_random_attacker_least(pfl_data):
    """One client sends random parameters every round: every other client gives it less
    weight than the uniform share, and its own mix is mostly itself."""
    server, _, out = servers_after(
        "fedamp_attention", pfl_data, "scenario.attack.kind=random", "scenario.attack.clients=1", "scenario.new_clients=0"
    )
    import pandas as pd

    att = pd.DataFrame(out.tables["attention"])
    bad = json.loads(out.tables["runs"][0]["malicious"])[0]
    others = att[(att.client != bad) & (att.peer == bad)]
    n = att.groupby(["round", "client"]).size().iloc[0]
    assert len(others) and (others.weight < 1 / n).all()
    assert all(r["malicious_share"] < 1 / r["clients_used"] for r in out.tables["rounds"])
    assert np.allclose(att.groupby(["round", "client"]).weight.sum(), 1.0)
    # the share is what the others gave it, its own weight on itself left out
    given = others.groupby("round").weight.mean()
    assert np.allclose([r["malicious_share"] for r in out.tables["rounds"]], given.to_numpy())
    own = att[(att.client == bad) & (att.peer == bad)].weight
    assert (own > 0.5).all()  # its own mix is mostly itself


def test_fedproto_without_its_pull_is_local_training_and_sends_only_prototypes(pfl_data):
    _, local = run_pfl("local_only", pfl_data, *FAST)
    _, free = run_pfl("fedproto", pfl_data, *FAST, "methods.fedproto.lam=0")
    _, pulled = run_pfl("fedproto", pfl_data, *FAST, "methods.fedproto.lam=100")

    def accs(out):
        return [r["test_acc"] for r in numbers(out)["clients"]]

    assert accs(free) == accs(local) and accs(pulled) != accs(local)
    per_client = 4 * (6 * 512 + 6)  # float32 sums (classes x hidden) and counts
    assert all(r["bytes_up"] == per_client * r["clients_used"] for r in pulled.tables["rounds"])


def test_apfl_learns_its_mix_and_predicts_with_it(pfl_data):
    server, kept, _ = servers_after("apfl", pfl_data, "methods.apfl.alpha=0.5")
    alphas = [float(kept[k]["alpha"][0]) for k in kept]
    assert all(0.0 <= a <= 1.0 for a in alphas) and any(a != 0.5 for a in alphas)
    k = sorted(kept)[0]
    a, own = alphas[0], {n[2:]: v for n, v in kept[k].items() if n.startswith("v.")}
    received = server.view("received", kept[k], k)
    assert np.allclose(received["head.weight"], a * own["head.weight"] + (1 - a) * server.glob["head.weight"], atol=1e-6)


def test_fedala_takes_the_lower_layers_and_mixes_the_top_by_learned_weights(pfl_data):
    server, kept, _ = servers_after("fedala", pfl_data)
    for k in sorted(kept):
        w = kept[k]["ala.head.weight"]
        assert w.shape == server.glob["head.weight"].shape and w.min() >= 0 and w.max() <= 1
        received = server.view("received", kept[k], k)
        assert np.array_equal(received["base.0.weight"], server.glob["base.0.weight"])  # below the mixed layers: the server's
        own = personal_of(kept[k])["head.weight"]
        assert np.allclose(received["head.weight"], own + (server.glob["head.weight"] - own) * w, atol=1e-6)
    assert any(not np.all(kept[k]["ala.head.weight"] == 1) for k in kept)  # learned, not left at their start


def test_fedreps_head_epochs_train_the_head_without_a_backward_pass_through_the_base():
    import torch

    from baselines.pfl.model import PFLConfig, net
    from baselines.pfl.standard import head_only
    from bench.api import MethodEnv, TrainSettings

    env = MethodEnv(
        feature_dim=4,
        num_classes=5,
        class_names=tuple("abcde"),
        dataset="x",
        run_seed=0,
        num_clients=2,
        train=TrainSettings(1, 8, "sgd", 0.1, 0.0, 0.0),
    )
    torch.manual_seed(0)
    for model_kind, x in (("cnn", torch.randint(0, 255, (3, 3, 32, 32)).float()), ("mlp", torch.randn(3, 4))):
        cfg = PFLConfig(model=model_kind)
        model = net(cfg, env, initial_state(cfg, env))
        out = head_only(model)(x)
        assert torch.equal(out, model(x))  # the same forward
        out.sum().backward()
        assert all(p.grad is None for p in model.base.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())


def test_the_prototype_pull_is_the_reference_codes_mse_and_does_not_grow_with_the_width():
    """FedProto's reference code (and PFLlib's) pulls features to prototypes with an MSE loss:
    the mean over the features, so a `lam` from the papers means the same at any width."""
    import torch

    from baselines.pfl.prototypes import prototype_distance

    gen = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 2, 1, 2])
    for width in (8, 512):
        feats, proto = torch.randn(4, width, generator=gen), torch.randn(3, width, generator=gen)
        got = prototype_distance(feats, y, {"proto": proto.numpy()})
        want = torch.nn.functional.mse_loss(feats, proto[y], reduction="none").mean(1)
        assert torch.allclose(got, want) and 1.0 < float(got.mean()) < 3.0  # about 2 (two unit variances) at any width

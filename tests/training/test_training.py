"""The shared training helpers: sample-weighted averaging of client updates."""

import numpy as np
import pytest
import torch

from bench.api import ClientUpdate
from bench.federation import weighted_average


@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (70_000,), (300, 257)])  # scalars to several blocks
def test_weighted_average_is_the_sample_weighted_mean(shape):
    rng = np.random.default_rng(0)
    counts = [5, 1, 30, 12]
    ups = [ClientUpdate(arrays={"w": rng.standard_normal(shape).astype(np.float32)}, num_samples=n) for n in counts]
    got = weighted_average(ups)["w"]
    want = np.average(np.stack([u.arrays["w"].astype(np.float64) for u in ups]), axis=0, weights=counts)
    assert got.dtype == np.float32 and got.shape == shape
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=1e-7)


def test_weighted_average_skips_updates_without_the_key_or_weight():
    a = ClientUpdate(arrays={"x": np.array([1.0, 2.0]), "only_a": np.array([5.0])}, num_samples=1)
    b = ClientUpdate(arrays={"x": np.array([3.0, 6.0])}, num_samples=3)
    zero = ClientUpdate(arrays={"x": np.array([100.0, 100.0])}, num_samples=0)
    out = weighted_average([a, b, zero])
    np.testing.assert_allclose(out["x"], [2.5, 5.0])
    np.testing.assert_allclose(out["only_a"], [5.0])
    assert weighted_average([a, b], keys=["x"], weights=[1, 1])["x"].tolist() == [2.0, 4.0]


def test_module_from_arrays_holds_copies_of_the_arrays_and_trains():
    """A client's model rebuilt from a payload: the payload's values (not a random start),
    trainable, and training it leaves the payload (the server's own arrays, in-process) alone."""
    from bench.training import module_arrays, module_from_arrays

    torch.manual_seed(0)
    source = module_arrays(torch.nn.Linear(6, 3), "head.")
    before = {k: v.copy() for k, v in source.items()}
    model = module_from_arrays(lambda: torch.nn.Linear(6, 3), source, "head.")
    assert all(np.array_equal(v, source[f"head.{k}"]) for k, v in module_arrays(model).items())
    assert all(p.requires_grad and p.device.type == "cpu" for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(2, 6)).sum().backward()
    opt.step()
    assert not np.array_equal(module_arrays(model)["weight"], before["head.weight"])
    assert all(np.array_equal(source[k], before[k]) for k in source)


def test_warm_up_pays_the_first_optimisers_lazy_import_before_any_run():
    """A sweep calls warm_up before its first run, so no run's clock includes the import that
    torch's first optimiser makes (about 1.3 s on the 2-core machine)."""
    import subprocess
    import sys

    code = (
        "import sys; from bench.training import warm_up; before = 'torch._dynamo' in sys.modules; "
        "warm_up(); print(before, 'torch._dynamo' in sys.modules)"
    )
    before, after = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    if before == "True":
        pytest.skip("this torch imports torch._dynamo eagerly: nothing left to warm up")
    assert after == "True"


def test_a_loss_that_stops_being_a_number_fails_training_with_what_to_do():
    """Both loops (one client, and many clients at once) check the loss they return: a
    diverged client is an error naming it, its task and round, not NaN weights trained on."""
    from torch.func import functional_call

    from bench.api import TrainContext, TrainSettings
    from bench.errors import Diverged
    from bench.training import train_epochs, train_epochs_batched

    torch.manual_seed(0)
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))

    def ctx(lr: float, client: int = 4) -> TrainContext:
        return TrainContext(0, 1, 7, client, TrainSettings(2, 16, "sgd", lr, 0.9, 0.0))

    model = torch.nn.Linear(6, 3)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def loss_fn(xb, yb):
        return torch.nn.functional.cross_entropy(model(xb), yb)

    assert np.isfinite(train_epochs(model.parameters(), x, y, ctx(0.1), loss_fn, torch.Generator().manual_seed(0)))
    with pytest.raises(Diverged, match=r"client 4's mean loss is (nan|inf) in task 1, round 7; lower training.lr"):
        train_epochs(model.parameters(), x, y, ctx(1e38), loss_fn, torch.Generator().manual_seed(0))

    def per_client(params, xb, yb):
        return torch.nn.functional.cross_entropy(functional_call(model, params, (xb,)), yb)

    _, losses = train_epochs_batched(start, [(x, y), (x, y)], [ctx(0.1, 0), ctx(0.1, 1)], per_client)
    assert all(np.isfinite(losses))
    with pytest.raises(Diverged, match="client 0's mean loss"):
        train_epochs_batched(start, [(x, y), (x, y)], [ctx(1e38, 0), ctx(1e38, 1)], per_client)

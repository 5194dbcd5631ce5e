"""The wire ledger: what a payload costs when the client keeps its last payload."""

import numpy as np

from bench.wire import MIN_CHUNK_BYTES, REF_BYTES, WireLedger, manifests


def charge(ledger: WireLedger, client: int, arrays: dict[str, np.ndarray]) -> int:
    return ledger.charge(client, manifests([arrays])[0])


def test_first_payload_costs_its_bytes_and_a_repeat_costs_references():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    small = np.arange(3)
    ledger = WireLedger()
    assert charge(ledger, 0, {"w": w, "small": small}) == w.nbytes + small.nbytes
    assert charge(ledger, 0, {"w": w.copy(), "small": small}) == REF_BYTES + small.nbytes  # content, not identity
    assert charge(ledger, 1, {"w": w}) == w.nbytes  # another client holds nothing yet


def test_a_changed_row_costs_that_row_and_references_for_the_rest():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    ledger = WireLedger()
    charge(ledger, 0, {"w": w})
    w2 = w.copy()
    w2[5] += 1
    assert charge(ledger, 0, {"w": w2}) == w.itemsize * 32 + 63 * REF_BYTES
    # appended rows (a new class's prompt next to the old ones) cost only themselves
    grown = np.concatenate([w2, rng.standard_normal((2, 32)).astype(np.float32)])
    assert charge(ledger, 0, {"w": grown}) == 2 * 32 * w.itemsize + 64 * REF_BYTES


def test_the_same_content_twice_in_one_payload_is_sent_once():
    rng = np.random.default_rng(2)
    model = rng.standard_normal((16, 64)).astype(np.float32)
    ledger = WireLedger()
    # a teacher identical to the current model (the start of a task) costs a reference
    assert charge(ledger, 0, {"proj": model, "teacher.proj": model.copy()}) == model.nbytes + REF_BYTES


def test_a_client_holds_only_its_last_payload():
    rng = np.random.default_rng(3)
    a, b = (rng.standard_normal((8, 64)).astype(np.float32) for _ in range(2))
    ledger = WireLedger()
    charge(ledger, 0, {"x": a})
    charge(ledger, 0, {"x": b})
    assert charge(ledger, 0, {"x": a}) == a.nbytes  # replaced by b, so sent again


def test_small_arrays_are_always_sent_in_full():
    tiny = np.zeros(MIN_CHUNK_BYTES // 8 - 1)
    ledger = WireLedger()
    assert charge(ledger, 0, {"t": tiny}) == charge(ledger, 0, {"t": tiny}) == tiny.nbytes


def test_shared_array_objects_are_hashed_once_and_give_the_same_manifest():
    w = np.ones((4, 512), dtype=np.float32)
    m = manifests([{"w": w}, {"w": w, "v": w.copy()}])
    assert m[0][0] is m[1][0]
    assert m[1][1] == m[1][0]

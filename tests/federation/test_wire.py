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


def rowwise_charge(held: set[bytes], manifest) -> tuple[int, set[bytes]]:
    """The ledger's rule chunk by chunk, row after row (what the set arithmetic must equal)."""
    now: set[bytes] = set()

    def send(digest: bytes, nbytes: int) -> int:
        cost = REF_BYTES if digest in held or digest in now else nbytes
        now.add(digest)
        return cost

    total = 0
    for m in manifest:
        if m.whole is None:
            total += m.nbytes
        elif m.whole[0] in held or m.whole[0] in now or not m.rows:
            total += send(*m.whole)
        else:
            total += sum(send(d, n) for d, n in m.rows)
            now.add(m.whole[0])
        now.update(m.row_digests)
    return total, now


def test_charges_equal_a_row_by_row_count_over_changing_payloads():
    """Rows changed, repeated within an array and across arrays, arrays grown and shrunk."""
    rng = np.random.default_rng(4)
    ledger, held = WireLedger(), {0: set(), 1: set()}
    base = rng.standard_normal((20, 64)).astype(np.float32)
    for step in range(30):
        w = base.copy()
        w[rng.integers(0, 20, size=rng.integers(0, 5))] += 1.0  # some rows changed
        w[rng.integers(0, 20)] = w[rng.integers(0, 20)]  # a row repeated within the array
        grown = np.concatenate([w[: rng.integers(1, 20)], rng.standard_normal((rng.integers(0, 3), 64)).astype(np.float32)])
        payload = {"w": w, "grown": grown, "again": w[::-1].copy(), "flat": rng.standard_normal(300).astype(np.float32)}
        client = step % 2
        expected, held[client] = rowwise_charge(held[client], manifests([payload])[0])
        assert ledger.charge(client, manifests([payload])[0]) == expected
        if step % 3 == 0:
            base = rng.standard_normal((20, 64)).astype(np.float32)


def test_row_digests_reused_from_the_cache_equal_fresh_ones():
    import bench.wire as wire

    w = np.random.default_rng(5).standard_normal((16, 256)).astype(np.float32)
    first = wire.array_manifest(w)
    wire._ROWS_CACHE.clear()
    assert wire.array_manifest(w.copy()) == first
    assert len(first.rows) == 16 and first.row_digests == {d for d, _ in first.rows}

"""Property sweep for `multilora.sampler.TemperatureBatchSampler` over random configurations.

The notebook (nbs/03_sampler.ipynb) tests hand-picked cases and the statistics; this file throws many random small
configurations (1-4 tasks, odd sizes, several ranks, both epoch modes, weights and caps) at the same invariants.
"""
import json, math
import numpy as np
import pytest
from multilora.sampler import TemperatureBatchSampler, task_probabilities


def random_config(seed):
    "A random valid sampler configuration: (sizes, kwargs without rank)"
    r = np.random.default_rng(seed)
    R, bs = int(r.choice([1, 2, 3, 4])), int(r.integers(1, 6))
    G, K = R * bs, int(r.integers(1, 5))
    sizes = {f"t{i}": int(r.integers(G, G * 12 + 2)) for i in range(K)}    # every task holds at least one global batch
    kw = dict(batch_size=bs, num_replicas=R, seed=int(r.integers(0, 2**31)),
              temperature=float(r.choice([0.5, 1, 2, 5, math.inf])))
    if r.random() < 0.3: kw["cap"] = int(r.integers(1, max(sizes.values()) + 1))
    if r.random() < 0.3 and K > 1: kw["weights"] = {"t0": float(r.uniform(0.05, 0.9))}
    mode = r.integers(3)
    if mode == 1: kw["num_batches"] = int(r.integers(1, 60))
    if mode == 2: kw["until_exhausted"] = f"t{int(r.integers(K))}"
    return sizes, kw


CONFIGS = [random_config(s) for s in range(60)]


@pytest.mark.parametrize("sizes,kw", CONFIGS)
def test_shards_partition_global_batches(sizes, kw):
    "Every rank yields the same number of homogeneous batches; at each step they are slices of one global batch"
    R, bs = kw["num_replicas"], kw["batch_size"]
    samplers = [TemperatureBatchSampler(sizes, rank=r, **kw) for r in range(R)]
    shards = [list(s) for s in samplers]
    single = list(TemperatureBatchSampler(sizes, **{**kw, "batch_size": bs * R, "num_replicas": 1}))
    assert {len(x) for x in shards} == {len(single)}
    s0 = samplers[0]
    for step, batches in enumerate(zip(*shards)):
        tasks = {s0.task_of(b) for b in batches}
        assert len(tasks) == 1
        t = tasks.pop()
        flat = [i for b in batches for i in b]
        assert flat == single[step]
        assert len(set(flat)) == len(flat) == bs * R
        assert all(s0.offsets[t] <= i < s0.offsets[t] + sizes[t] for i in flat)


@pytest.mark.parametrize("sizes,kw", CONFIGS)
def test_len_matches_iteration(sizes, kw):
    s = TemperatureBatchSampler(sizes, **kw)
    for _ in range(3):
        n = len(s)
        assert len(list(s)) == n
    if "until_exhausted" not in kw:
        assert n == kw.get("num_batches", sum(sizes.values()) // (kw["batch_size"] * kw["num_replicas"]))


@pytest.mark.parametrize("sizes,kw", CONFIGS)
def test_without_replacement_within_a_pass(sizes, kw):
    "Per task, each run of floor(N/G) consecutive global batches (one pass) never repeats an index"
    G = kw["batch_size"] * kw["num_replicas"]
    s = TemperatureBatchSampler(sizes, **{**kw, "batch_size": G, "num_replicas": 1})
    per_task = {t: [] for t in sizes}
    for b in s: per_task[s.task_of(b)].append(b)
    for t, batches in per_task.items():
        per_pass = sizes[t] // G
        for p in range(0, len(batches), per_pass):
            idx = [i for b in batches[p:p + per_pass] for i in b]
            assert len(set(idx)) == len(idx)
    for t, batches in per_task.items():                                     # and each pass is a new shuffle
        per_pass = sizes[t] // G
        passes = [sum(batches[p:p + per_pass], []) for p in range(0, len(batches) - per_pass + 1, per_pass)]
        if per_pass * G >= 8: assert all(x != y for x, y in zip(passes, passes[1:]))
    if "until_exhausted" in kw: assert len(per_task[kw["until_exhausted"]]) == sizes[kw["until_exhausted"]] // G


@pytest.mark.parametrize("sizes,kw", CONFIGS)
def test_resume_anywhere(sizes, kw):
    "Interrupt a random rank at a random step, load a JSON copy of the state saved by rank 0, continue identically"
    r = np.random.default_rng(kw["seed"])
    rank = int(r.integers(kw["num_replicas"]))
    ref = TemperatureBatchSampler(sizes, rank=rank, **kw)
    epochs = [list(ref) for _ in range(3)]
    a, a0 = TemperatureBatchSampler(sizes, rank=rank, **kw), TemperatureBatchSampler(sizes, rank=0, **kw)
    k = int(r.integers(0, len(epochs[0]) + 1))
    it, it0 = iter(a), iter(a0)
    head = [next(it) for _ in range(k)]
    for _ in range(k): next(it0)
    state = json.loads(json.dumps(a0.state_dict()))
    assert state == a.state_dict() == a.state_at(0, k)                    # the state does not depend on the rank
    b = TemperatureBatchSampler(sizes, rank=rank, **kw)
    b.load_state_dict(state)
    rest, after = list(b), list(b)
    if k < len(epochs[0]): assert (head + rest, after) == (epochs[0], epochs[1])
    else: assert (head, rest, after) == tuple(epochs)                     # the last batch already moved to epoch 1


def test_probabilities_sum_to_one_and_order():
    for sizes, kw in CONFIGS:
        p = task_probabilities(sizes, kw["temperature"], kw.get("cap"), kw.get("weights"))
        assert list(p) == list(sizes)
        assert abs(sum(p.values()) - 1) < 1e-9
        assert all(v >= 0 for v in p.values())

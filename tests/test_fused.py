"""Fused multi-adapter steps (nbs/04a_fused.ipynb): equality with per-task steps, isolation, the sampler, resume, the CLI."""
import copy, json, math, subprocess, sys
from dataclasses import replace
from pathlib import Path
import numpy as np
import pytest
import torch
from test_sampler import CONFIGS
from multilora.adapters import PromptTemplate, Task, adapter_parameters, attach_adapters
from multilora.data import builtin_tasks, tokenize_task
from multilora.model import load_base_model
from multilora.sampler import FusedBatchSampler, TemperatureBatchSampler, task_probabilities
from multilora.train import MultiLoRATrainer, TrainConfig

# -- the sampler --

@pytest.mark.parametrize("sizes,kw", CONFIGS[:30])
def test_fused_shards_partition_one_global_draw(sizes, kw):
    "Every rank yields as many steps; at each step the ranks' rows are consecutive slices of one draw, no repeats"
    R, bs = kw["num_replicas"], kw["batch_size"]
    shards = [list(FusedBatchSampler(sizes, rank=r, **kw)) for r in range(R)]
    single = list(FusedBatchSampler(sizes, **{**kw, "batch_size": bs * R, "num_replicas": 1}))
    assert {len(x) for x in shards} == {len(single)} == {len(FusedBatchSampler(sizes, **kw))}
    for step, batches in enumerate(zip(*shards)):
        flat = [i for b in batches for i in b]
        assert flat == single[step] and len(set(flat)) == len(flat) == bs * R


@pytest.mark.parametrize("sizes,kw", CONFIGS[:30])
def test_fused_resume_anywhere(sizes, kw):
    "Interrupt at a random step, JSON round-trip rank 0's state, continue identically; `state_at` agrees"
    r = np.random.default_rng(kw["seed"])
    rank = int(r.integers(kw["num_replicas"]))
    epochs = (lambda s: [list(s) for _ in range(2)])(FusedBatchSampler(sizes, rank=rank, **kw))
    a, a0 = FusedBatchSampler(sizes, rank=rank, **kw), FusedBatchSampler(sizes, rank=0, **kw)
    k = int(r.integers(0, len(epochs[0])))
    it, it0 = iter(a), iter(a0)
    head = [next(it) for _ in range(k)]
    for _ in range(k): next(it0)
    state = json.loads(json.dumps(a0.state_dict()))
    assert state == a.state_dict() == a.state_at(0, k)
    b = FusedBatchSampler(sizes, rank=rank, **kw)
    b.load_state_dict(state)
    assert head + list(b) == epochs[0] and list(b) == epochs[1]


def test_fused_rows_follow_the_temperature_shares():
    "Rows per task over many steps sit within 5 binomial sigmas of p_i, and the check rejects another temperature"
    sizes = {"a": 4000, "b": 1000, "c": 100}
    s = FusedBatchSampler(sizes, batch_size=8, temperature=2, num_batches=5000, seed=7)
    rows = np.bincount([s.tasks.index(s.task_of([i])) for b in s for i in b], minlength=3)
    n = rows.sum()
    def ok(p): return all(abs(rows[j] / n - p[t]) <= 5 * math.sqrt(p[t] * (1 - p[t]) / n) for j, t in enumerate(sizes))
    assert ok(task_probabilities(sizes, 2)) and not ok(task_probabilities(sizes, 1))
    assert s.update_probabilities["c"] == pytest.approx(1 - (1 - task_probabilities(sizes, 2)["c"]) ** 8)


def test_fused_and_whole_step_states_do_not_mix():
    sizes = {"a": 40, "b": 20}
    with pytest.raises(ValueError, match="rows"): FusedBatchSampler(sizes, 4).load_state_dict(TemperatureBatchSampler(sizes, 4).state_dict())
    with pytest.raises(ValueError, match="rows"): TemperatureBatchSampler(sizes, 4).load_state_dict(FusedBatchSampler(sizes, 4).state_dict())

# -- the step, on the real NF4 model in fp32 --

SHOUT = Task("shout", template=PromptTemplate(prompt="Repeat in capitals: {text}\n", completion="{upper}"), r=4,
             target_modules=["o_proj"], lora_dropout=0.0,
             dataset=[{"text": t, "upper": t.upper()} for t in ["hi there", "good night", "see you", "well done"] * 4])


@pytest.fixture(scope="module")
def setup():
    tasks = [replace(t, lora_dropout=0.0) for t in builtin_tasks()] + [SHOUT]
    base, tok = load_base_model(compute_dtype="float32")
    torch.manual_seed(0)
    model = attach_adapters(base, tasks, verbose=False)
    for t in tasks:                                  # B = 0 at init would make every A gradient zero
        for k, p in adapter_parameters(model, t.name).items():
            if "lora_B" in k: p.data.normal_(0, 0.02)
    data = {t.name: tokenize_task(t, tok, "train", 192, 16) for t in tasks}
    return model, tok, tasks, data


def _weights(model, tasks):
    return {k: p.detach().clone() for t in tasks for k, p in adapter_parameters(model, t.name).items()}


def _set(model, weights):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in weights.items(): params[k].copy_(v)


def _spy_grads(trainer, into):
    "Record each adapter's gradient as `_update` receives it (the real `_update` then runs)."
    real = trainer._update
    def update(task, finite):
        into[task] = {k: p.grad.clone() for k, p in adapter_parameters(trainer.unwrapped, task).items()}
        return real(task, finite)
    trainer._update = update


@pytest.mark.parametrize("packing", [False, True])
def test_fused_step_equals_the_per_task_steps(setup, tmp_path, packing):
    "Same rows: the same per-task losses and token counts, the same gradients of every adapter, the same weights after"
    model, tok, tasks, data = setup
    cfg = dict(batch_size=6, grad_accum=1, max_length=192, learning_rate=1e-3, mixed_precision="no", packing=packing,
               progress=False)
    per_task = MultiLoRATrainer(model, tok, tasks, TrainConfig(output_dir=str(tmp_path/"i"), **cfg), train_data=data)
    fused = MultiLoRATrainer(model, tok, tasks, TrainConfig(output_dir=str(tmp_path/"f"), fused=True, **cfg), train_data=data)
    idx = [0, 1, 2, 16, 17, 32]                      # 3 summarization rows, 2 SQL rows, 1 shout row
    feats = [fused.dataset[i] for i in idx]
    start = _weights(model, tasks)
    g_ref, g_fused = {}, {}
    _spy_grads(per_task, g_ref)
    _spy_grads(fused, g_fused)
    ref = [per_task._train_step(t, [f for f in feats if f["task"] == t]) for t in ("summarization", "sql_generation", "shout")]
    after_ref = _weights(model, tasks)
    _set(model, start)
    got = fused._step(idx)
    assert [r["task"] for r in got] == [r["task"] for r in ref]
    for r, q in zip(got, ref):
        assert r["loss"] == pytest.approx(q["loss"], rel=1e-5) and r["tokens"] == q["tokens"]
        assert r["grad_norm"] == pytest.approx(q["grad_norm"], rel=1e-5)
    for t in g_ref:
        for k, g in g_ref[t].items(): torch.testing.assert_close(g_fused[t][k], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()))
    # Adam's first step is lr * g / (|g| + eps): where |g| is far above eps it is +-lr whatever the rounding, and where
    # |g| is near eps the gradients' rounding (checked above to 1e-5 of the largest) decides it. So the weights are
    # compared where the gradient is 1000 eps or more: rows through the wrong adapter would change those by about lr
    grads = {k: g for t in g_ref for k, g in g_ref[t].items()}
    for k, w in _weights(model, tasks).items():
        decided = grads[k].abs() > 1e3 * 1e-8
        assert decided.float().mean() > 0.5                  # most of every tensor is compared
        torch.testing.assert_close(w[decided], after_ref[k][decided], rtol=1e-5, atol=1e-7)
    # a step without the shout task leaves its adapter, optimizer moments and schedule exactly as they were
    shout_w, shout_opt = _weights(model, [SHOUT]), copy.deepcopy(fused.optimizers["shout"].state_dict())
    assert shout_opt["state"], "the shout adapter should have optimizer state after its first update"
    assert [r["task"] for r in fused._step([3, 4, 18])] == ["summarization", "sql_generation"]
    assert all(torch.equal(w, shout_w[k]) for k, w in _weights(model, [SHOUT]).items())
    now = fused.optimizers["shout"].state_dict()["state"]
    assert all(torch.equal(now[i][m], shout_opt["state"][i][m]) for i in shout_opt["state"] for m in shout_opt["state"][i])
    assert (fused.updates["shout"], fused.schedulers["shout"].last_epoch) == (1, 1)
    assert fused.updates == {"summarization": 2, "sql_generation": 2, "shout": 1}


def test_fused_accumulation_weights_tokens_over_the_draw(setup, tmp_path):
    "grad_accum=3 micro-batches of 2 rows: the gradients of one 6-row draw, as one micro-batch computes them"
    model, tok, tasks, data = setup
    grads = {}
    for accum, bs in ((1, 6), (3, 2)):
        cfg = TrainConfig(output_dir=str(tmp_path/f"a{accum}"), batch_size=bs, grad_accum=accum, max_length=192,
                          mixed_precision="no", fused=True, progress=False)
        tr = MultiLoRATrainer(model, tok, tasks, cfg, train_data=data)
        start = _weights(model, tasks)
        grads[accum] = {}
        _spy_grads(tr, grads[accum])
        tr._step([0, 16, 1, 17, 2, 32])              # rows of the three tasks, mixed across micro-batches
        _set(model, start)
    assert grads[1].keys() == grads[3].keys() == {"summarization", "sql_generation", "shout"}
    for t in grads[1]:
        for k, g in grads[1][t].items(): torch.testing.assert_close(grads[3][t][k], g, rtol=1e-5, atol=1e-5 * float(g.abs().max()))


class Stopped(Exception): "The run stops here, as a kill would stop it."


def test_fused_run_resumes_exactly(setup, tmp_path):
    "A fused run stopped after its step-2 checkpoint and resumed ends with the weights of an uninterrupted run"
    model, tok, tasks, data = setup
    start = _weights(model, tasks)
    def cfg(name): return TrainConfig(output_dir=str(tmp_path/name), max_steps=4, batch_size=4, max_length=192,
                                      checkpoint_every=2, mixed_precision="no", fused=True, progress=False, seed=3)
    MultiLoRATrainer(model, tok, tasks, cfg("straight"), train_data=data).train()
    straight = _weights(model, tasks)
    _set(model, start)
    stopped = MultiLoRATrainer(model, tok, tasks, cfg("stopped"), train_data=data)
    real_save = stopped.save_checkpoint
    def save_then_stop():
        real_save()
        raise Stopped
    stopped.save_checkpoint = save_then_stop
    with pytest.raises(Stopped): stopped.train()
    assert stopped.step == 2
    _set(model, start)                                        # the resumed run must take everything from the checkpoint
    resumed = MultiLoRATrainer(model, tok, tasks, cfg("stopped"), train_data=data)
    resumed.train(resume=True)
    assert resumed.step == 4
    after = _weights(model, tasks)
    assert all(torch.equal(after[k], straight[k]) for k in straight)
    assert any(not torch.equal(after[k], start[k]) for k in start)
    log = [json.loads(l) for l in (tmp_path/"stopped"/"metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in log}) == [1, 2, 3, 4] and all("examples" in r for r in log)

# -- the CLI --

YAML = """quantization: nf4
train:
  output_dir: {out}
  max_steps: 2
  batch_size: 4
  max_length: 128
  train_limit: 12
  progress: false
{fused}tasks:
  - preset: summarization
    data: builtin:summarization
  - preset: sql_generation
    data: builtin:sql_generation
"""


@pytest.mark.parametrize("how", ["yaml", "flag"])
def test_cli_trains_fused(tmp_path, how):
    cfg = tmp_path/"run.yaml"
    cfg.write_text(YAML.format(out=tmp_path/"run", fused="  fused: true\n" if how == "yaml" else ""))
    r = subprocess.run([sys.executable, "-m", "multilora", "train", "--config", str(cfg), *(["--fused"] if how == "flag" else [])],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(l) for l in (tmp_path/"run"/"metrics.jsonl").read_text().splitlines()]
    assert {x["step"] for x in log} == {1, 2} and all(x["examples"] > 0 for x in log)
    assert sum(x["examples"] for x in log) == 2 * 4                      # every row of both steps trained some adapter
    assert json.loads((tmp_path/"run"/"checkpoints"/"step-0000002"/"state.json").read_text())["config"]["fused"] is True
    assert (tmp_path/"run"/"adapters"/"sql_generation"/"adapter_model.safetensors").exists()

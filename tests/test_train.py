"""Training behaviour that a notebook cannot show: a real SIGKILL mid-run and a resume, the CLI, and accumulation."""
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
import torch
from safetensors.torch import load_file

TINY = """
quantization = "nf4"
[train]
output_dir = "{out}"
max_steps = {steps}
batch_size = 2
grad_accum = {accum}
learning_rate = 1e-3
max_length = 128
train_limit = 24
checkpoint_every = 2
keep_checkpoints = 2
seed = 0
progress = false
[[tasks]]
preset = "summarization"
data = "builtin:summarization"
[[tasks]]
preset = "sql_generation"
data = "builtin:sql_generation"
"""

def _config(tmp_path, name, steps=8, accum=1):
    f = tmp_path/f"{name}.toml"
    f.write_text(TINY.format(out=tmp_path/name, steps=steps, accum=accum))
    return f

def _train(cfg, *extra, **kw):
    return subprocess.run([sys.executable, "-m", "multilora", "train", "--config", str(cfg), *extra],
                          capture_output=True, text=True, **kw)

def _weights(run_dir):
    out = {}
    for f in sorted((Path(run_dir)/"adapters").glob("*/adapter_model.safetensors")):
        for k, v in load_file(f).items(): out[f"{f.parent.name}/{k}"] = v
    return out

def test_kill_and_resume_matches_uninterrupted(tmp_path):
    straight = _train(_config(tmp_path, "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]

    cfg = _config(tmp_path, "killed")
    proc = subprocess.Popen([sys.executable, "-m", "multilora", "train", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ck = tmp_path/"killed"/"checkpoints"/"step-0000004"
    deadline = time.time() + 600
    while not ck.exists() and proc.poll() is None and time.time() < deadline: time.sleep(0.2)
    assert ck.exists(), "no checkpoint appeared before the process ended"
    time.sleep(1.0)  # let it get into step 5 or 6, mid-step
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path/"killed"/"adapters").exists(), "the run finished before it was killed; the test proves nothing"

    resumed = _train(cfg, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(tmp_path/"straight"), _weights(tmp_path/"killed")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a: assert torch.equal(a[k], b[k]), f"{k} differs after kill and resume"
    steps = [r["step"] for r in map(json.loads, (tmp_path/"killed"/"metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, 9)), steps  # every step logged exactly once

def test_fresh_run_refuses_to_clobber_checkpoints(tmp_path):
    cfg = _config(tmp_path, "twice", steps=2)
    assert _train(cfg).returncode == 0
    again = _train(cfg)
    assert again.returncode == 2
    assert "already holds checkpoints" in again.stderr and "Traceback" not in again.stderr

def test_accumulation_never_mixes_tasks_and_schedules_are_per_adapter(tmp_path):
    from multilora.train import load_config, TrainConfig, MultiLoRATrainer, tasks_from_config
    from multilora.model import load_base_model
    from multilora.adapters import attach_adapters
    raw = load_config(_config(tmp_path, "accum", steps=6, accum=3))
    tasks = tasks_from_config(raw["tasks"])
    base, tok = load_base_model()
    model = attach_adapters(base, tasks, verbose=False)
    tr = MultiLoRATrainer(model, tok, tasks, TrainConfig.from_dict(raw["train"]))
    seen, orig = [], tr._train_step
    def spy(task, feats):
        seen.append((task, {f["task"] for f in feats}, len(feats)))
        return orig(task, feats)
    tr._train_step = spy
    tr.train()
    assert len(seen) == 6
    for task, feat_tasks, n in seen:
        assert feat_tasks == {task} and n == 2 * 3  # batch_size × grad_accum examples, all of the draw's task
    counts = {n: sum(t == n for t, _, _ in seen) for n in tr.tasks}
    assert tr.updates == counts
    assert {n: s.last_epoch for n, s in tr.schedulers.items()} == counts  # each schedule advanced on its own updates only
    assert all(c > 0 for c in counts.values()), "both tasks should be drawn in 6 steps at this seed"

def test_cli_errors_are_one_line(tmp_path):
    bad = tmp_path/"bad.toml"
    bad.write_text('[train]\nmax_stepz = 3\n[[tasks]]\npreset = "summarization"\n')
    r = _train(bad)
    assert r.returncode == 2 and "Unknown training setting(s) ['max_stepz']" in r.stderr and "Traceback" not in r.stderr

def test_packing_trains_on_the_same_tokens_as_padding(tmp_path):
    "`--packing` changes the layout of a step, not what it learns: same examples, same tokens, same loss, same weights."
    runs = {}
    for name, extra in (("padded", ()), ("packed", ("--packing",))):
        cfg = tmp_path/f"{name}.toml"
        cfg.write_text(TINY.format(out=tmp_path/name, steps=4, accum=1).replace('preset = "summarization"\n', 'preset = "summarization"\nlora_dropout = 0.0\n')
                       .replace('preset = "sql_generation"\n', 'preset = "sql_generation"\nlora_dropout = 0.0\n'))
        r = _train(cfg, *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = [x for x in map(json.loads, (tmp_path/name/"metrics.jsonl").read_text().splitlines()) if "loss" in x]
    pad, pack = runs["padded"], runs["packed"]
    assert [r["task"] for r in pad] == [r["task"] for r in pack]
    assert [r["tokens"] for r in pad] == [r["tokens"] for r in pack]           # real tokens, counted the same way
    for a, b in zip(pad, pack): assert abs(a["loss"] - b["loss"]) <= 1e-3 * abs(a["loss"]), (a, b)
    wa, wb = _weights(tmp_path/"padded"), _weights(tmp_path/"packed")
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa: torch.testing.assert_close(wa[k], wb[k], rtol=1e-3, atol=1e-5)

def test_adapter_switch_matches_peft():
    "The trainer's adapter switch leaves every layer, the model and the outputs as peft's `set_adapter` does (run at the lower bounds too)."
    from types import SimpleNamespace
    from multilora.train import MultiLoRATrainer, _plain_lora_layers
    from multilora.model import load_base_model
    from multilora.adapters import attach_adapters, adapter_names, adapter_parameters, summarization_task, sql_task
    base, tok = load_base_model()
    torch.manual_seed(0)
    model = attach_adapters(base, [summarization_task(), sql_task()], verbose=False).eval()
    names = adapter_names(model)
    for n in names:
        for k, p in adapter_parameters(model, n).items():
            if "lora_B" in k: torch.nn.init.normal_(p, std=0.05)   # zero B would hide which adapter ran
    trainer = SimpleNamespace(unwrapped=model, _switchable=None,
                              params={n: list(adapter_parameters(model, n).values()) for n in names})
    ids = torch.randint(0, tok.vocab_size, (2, 16))
    layers = lambda: [m.active_adapters for m in _plain_lora_layers(model)]
    outputs = {}
    for task in names + names:
        other = [n for n in names if n != task][0]
        model.set_adapter(task)
        want_layers, want_model = layers(), model.active_adapters
        with torch.no_grad(): want = model(input_ids=ids).logits
        model.set_adapter(other)
        MultiLoRATrainer._activate(trainer, task)
        assert trainer._switchable and layers() == want_layers and model.active_adapters == want_model == [task]
        with torch.no_grad(): got = model(input_ids=ids).logits
        assert torch.equal(got, want), task
        assert all(p.requires_grad == (n == task) for n, ps in trainer.params.items() for p in ps)
        outputs[task] = got
    assert not torch.allclose(outputs[names[0]], outputs[names[1]])     # the two adapters do differ

def test_a_loaded_model_trains_in_training_mode(tmp_path):
    """A loaded model is in eval mode and the peft model around it says `training` regardless: the trainer must put every
    module in training mode, or LoRA dropout and gradient checkpointing silently stay off. With checkpointing asked for,
    each decoder layer runs in training mode, under the checkpoint function, with its LoRA dropout on."""
    from multilora.model import load_base_model
    from multilora.adapters import attach_adapters
    from multilora.data import builtin_tasks, tokenize_task
    from multilora.train import MultiLoRATrainer, TrainConfig
    base, tok = load_base_model()
    tasks = builtin_tasks()
    model = attach_adapters(base, tasks, verbose=False)
    assert model.training and not base.model.layers[0].training       # the state load_base_model + attach_adapters leave
    data = {t.name: tokenize_task(t, tok, "train", 128, 8) for t in tasks}
    layer = base.model.layers[3]
    modes, checkpointed = [], []
    layer.register_forward_pre_hook(lambda m, a: modes.append((m.training, m.self_attn.q_proj.lora_dropout[tasks[0].name].training)))
    cfg = TrainConfig(output_dir=str(tmp_path/"run"), max_steps=2, batch_size=2, max_length=128, progress=False,
                      gradient_checkpointing=True, checkpoint_every=10**6)
    tr = MultiLoRATrainer(model, tok, tasks, cfg, train_data=data)
    run_checkpointed = layer._gradient_checkpointing_func
    layer._gradient_checkpointing_func = lambda *a, **k: checkpointed.append(1) or run_checkpointed(*a, **k)
    tr.train()
    # one forward per micro-batch; transformers before 5.2x checkpoints `__call__`, so the hook sees the recomputation too
    assert len(modes) in (2, 4) and all(m == (True, True) for m in modes), modes
    assert len(checkpointed) == 2, len(checkpointed)

"""Liger's fused kernels in whole training runs (chapter 4d): a clear refusal where they cannot run, and on a GPU the
same losses as the unfused run, falling, with the model given back unpatched. The GPU tests run on a GPU machine
(`pytest tests/test_liger.py`)."""
import importlib.util, json, subprocess, sys
from pathlib import Path
import pytest
import torch
from test_train import TINY

gpu = pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("liger_kernel") is None,
                         reason="Liger's kernels need a GPU and liger-kernel")

def _config(tmp_path, name, liger, steps=8, dropout=None):
    f = tmp_path/f"{name}.toml"
    text = TINY.format(out=tmp_path/name, steps=steps, accum=1).replace("progress = false", f"progress = false\nliger = {liger}\ncuda_graphs = false")   # eager: the fused loss too
    if dropout is not None: text = text.replace('data = "builtin:summarization"', f'data = "builtin:summarization"\nlora_dropout = {dropout}')
    if dropout is not None: text = text.replace('data = "builtin:sql_generation"', f'data = "builtin:sql_generation"\nlora_dropout = {dropout}')
    f.write_text(text)
    return f

def _losses(run_dir):
    return [r for r in map(json.loads, (Path(run_dir)/"metrics.jsonl").read_text().splitlines()) if "loss" in r]

def test_liger_setting_is_checked():
    from multilora.train import TrainConfig
    with pytest.raises(ValueError, match="liger must be true, false or auto"): TrainConfig(liger="yes")

def test_liger_refused_on_a_cpu(tmp_path):
    "On a CPU `liger = true` is a one-line error before any training; `auto` trains unfused and says nothing of Liger."
    if torch.cuda.is_available(): pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, "-m", "multilora", "train", "--config", str(_config(tmp_path, "cpu", "true"))],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "liger=True, but it runs on the GPU only" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path/"cpu"/"metrics.jsonl").exists()
    from multilora.train import load_config, trainer_from_config
    tr = trainer_from_config(load_config(_config(tmp_path, "auto", '"auto"')))
    assert tr.plan["liger"] is False and tr.plan["liger_loss"] is False

@gpu
def test_liger_run_matches_unfused_run(tmp_path):
    """Eight steps of both adapters with Liger's kernels and without, dropout off: the same tasks and tokens, the losses
    to bf16 rounding, and afterwards no module of the model keeps a replaced forward."""
    from multilora.train import load_config, trainer_from_config
    runs = {}
    for name, liger in (("plain", "false"), ("liger", "true")):
        tr = trainer_from_config(load_config(_config(tmp_path, name, liger, dropout=0.0)))
        tr.train()
        runs[name] = tr
    assert runs["liger"].plan["liger"] and not runs["plain"].plan["liger"]
    a, b = _losses(tmp_path/"plain"), _losses(tmp_path/"liger")
    assert [(r["task"], r["tokens"]) for r in a] == [(r["task"], r["tokens"]) for r in b]
    # before an adapter's first update both runs compute the same function: its loss agrees to bf16 rounding; after
    # it, Adam's first steps (about lr * sign(gradient)) carry the rounding on, and the losses may drift a few percent
    first = {r["task"]: (r, s) for r, s in reversed(list(zip(a, b)))}
    for x, y in first.values(): assert abs(x["loss"] - y["loss"]) <= 0.01 * abs(x["loss"]), (x, y)
    for x, y in zip(a, b): assert abs(x["loss"] - y["loss"]) <= 0.08 * abs(x["loss"]) + 1e-3, (x, y)
    replaced = [n for n, m in runs["liger"].unwrapped.named_modules() if "forward" in vars(m)]
    assert replaced == [], replaced[:5]

@gpu
def test_liger_run_learns(tmp_path):
    "Forty steps with Liger's kernels (and the default dropout): each task's loss falls."
    from multilora.train import load_config, trainer_from_config
    tr = trainer_from_config(load_config(_config(tmp_path, "learn", "true", steps=40)))
    tr.train()
    for task in tr.tasks:
        ls = [r["loss"] for r in _losses(tmp_path/"learn") if r["task"] == task]
        assert sum(ls[-4:]) / 4 < sum(ls[:4]) / 4, (task, ls)

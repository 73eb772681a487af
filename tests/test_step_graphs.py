"""Training steps as CUDA graphs (chapter 4c) in whole runs: the same losses as eager steps, an exact resume, and a clear
refusal where graphs cannot run. The GPU tests run on a GPU machine (`pytest tests/test_step_graphs.py`)."""
import json, shutil, subprocess, sys
from pathlib import Path
import pytest
import torch
from test_train import TINY, _weights

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")

def _config(tmp_path, name, steps=8, checkpoint_every=4, graphs="true", extra=""):
    f = tmp_path/f"{name}.toml"
    text = TINY.format(out=tmp_path/name, steps=steps, accum=1).replace("checkpoint_every = 2", f"checkpoint_every = {checkpoint_every}")
    f.write_text(text.replace("progress = false", f"progress = false\ncuda_graphs = {graphs}{extra}"))
    return f

def _trainer(cfg_file):
    from multilora.train import load_config, trainer_from_config
    return trainer_from_config(load_config(cfg_file))

def _same_parameter(live: str, saved: str) -> bool:
    "Whether a live adapter parameter (`task/...lora_A.task.weight`) is the saved one (`task/...lora_A.weight`)."
    task, name = live.split("/", 1)
    return task == saved.split("/", 1)[0] and name.replace(f".{task}.", ".").split("base_model.model.")[-1] == saved.split("/", 1)[1].split("base_model.model.")[-1]

def _losses(run_dir):
    return [r for r in map(json.loads, (Path(run_dir)/"metrics.jsonl").read_text().splitlines()) if "loss" in r]

def test_graphs_refused_where_they_cannot_run(tmp_path):
    "On a CPU `cuda_graphs = true` is a one-line error before any training, not a crash or a silent eager run."
    if torch.cuda.is_available(): pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, "-m", "multilora", "train", "--config", str(_config(tmp_path, "cpu", graphs="true"))],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "cuda_graphs=True needs one process on a GPU" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path/"cpu"/"metrics.jsonl").exists()

def test_graphs_with_fused_steps_are_refused():
    from multilora.train import TrainConfig
    with pytest.raises(ValueError, match="fused steps run eagerly"): TrainConfig(cuda_graphs=True, fused=True)
    with pytest.raises(ValueError, match="cuda_graphs must be"): TrainConfig(cuda_graphs="yes")

@cuda
def test_graphed_run_matches_eager_run(tmp_path):
    """Eight steps of both adapters with graphs and without, dropout off: the same tasks and tokens, the losses to bf16
    rounding, and each adapter's weights moved the same way. (Adam's first updates are about lr * sign(gradient), so an
    element whose gradient is rounding noise may move either way: the updates are compared as vectors, not elementwise.)"""
    from multilora.adapters import adapter_parameters
    runs, initial = {}, {}
    no_dropout = "\n".join(["", "[[tasks]]", 'preset = "summarization"', 'data = "builtin:summarization"', "lora_dropout = 0.0",
                            "[[tasks]]", 'preset = "sql_generation"', 'data = "builtin:sql_generation"', "lora_dropout = 0.0"])
    for name, graphs in (("eager", "false"), ("graphs", "true")):
        f = _config(tmp_path, name, graphs=graphs, extra="\nliger = false")   # graphs alone: the same kernels either way
        f.write_text(f.read_text().split("[[tasks]]")[0].rstrip() + no_dropout + "\n")
        tr = _trainer(f)
        initial = {f"{n}/{k}": p.detach().cpu().clone() for n in tr.tasks for k, p in adapter_parameters(tr.unwrapped, n).items()}
        tr.train()
        runs[name] = tr
    assert runs["graphs"].graph_counts["replayed"] >= 8 and runs["graphs"].graph_counts["captured"] >= 2
    assert runs["eager"].graph_counts == {}
    a, b = _losses(tmp_path/"eager"), _losses(tmp_path/"graphs")
    assert [r["task"] for r in a] == [r["task"] for r in b] and [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for x, y in zip(a, b): assert abs(x["loss"] - y["loss"]) <= 2e-2 * abs(x["loss"]), (x, y)
    wa, wb = _weights(tmp_path/"eager"), _weights(tmp_path/"graphs")
    assert wa.keys() == wb.keys() and len(initial) == len(wa) > 0
    for task in runs["eager"].tasks:
        keys = [k for k in wa if k.startswith(task + "/")]
        start = [next(v for n, v in initial.items() if _same_parameter(n, k)) for k in keys]
        da = torch.cat([(wa[k].float() - s.float()).flatten() for k, s in zip(keys, start)])
        db = torch.cat([(wb[k].float() - s.float()).flatten() for k, s in zip(keys, start)])
        cos = float(da @ db / (da.norm() * db.norm()))
        assert da.norm() > 0 and cos >= 0.9, (task, cos)

@cuda
def test_graphed_run_resumes_exactly(tmp_path):
    "A graphed run resumed from its step-4 checkpoint ends with the weights of the same run left uninterrupted."
    straight = _trainer(_config(tmp_path, "straight", extra="\nliger = false"))
    straight.train()
    (tmp_path/"resumed"/"checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path/"straight"/"checkpoints"/"step-0000004", tmp_path/"resumed"/"checkpoints"/"step-0000004")
    shutil.copy(tmp_path/"straight"/"metrics.jsonl", tmp_path/"resumed"/"metrics.jsonl")
    resumed = _trainer(_config(tmp_path, "resumed", extra="\nliger = false"))
    resumed.train(resume=True)
    assert resumed.graph_counts["replayed"] >= 4
    a, b = _weights(tmp_path/"straight"), _weights(tmp_path/"resumed")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a: assert torch.equal(a[k], b[k]), f"{k} differs after resuming a graphed run"
    assert [r["loss"] for r in _losses(tmp_path/"straight")] == [r["loss"] for r in _losses(tmp_path/"resumed")]

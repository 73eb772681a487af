"Multi-process training on CPU (2 processes, gloo) and the vLLM export, through the real command line."
import json, os, subprocess, sys
from pathlib import Path
import pytest, torch
from safetensors.torch import load_file
os.environ.setdefault("MULTILORA_CACHE", "/tmp/mlcache")
from multilora.bench import random_model
from multilora.scaling import compare_runs, ddp_config

@pytest.fixture(scope="module")
def config(tmp_path_factory):
    "The DDP comparison's config (the GPU run's, `multilora bench ddp`), sized for a CPU."
    return ddp_config(random_model("tiny"), tmp_path_factory.mktemp("cfg")/"tiny.toml", max_steps=6, learning_rate=1e-3,
                      max_length=192, train_limit=96, checkpoint_every=3, keep_checkpoints=2)

def train(config, out, procs=1, *extra):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)] if procs > 1 else [sys.executable]
    r = subprocess.run([*launcher, "-m", "multilora", "train", "--config", str(config), "--output-dir", str(out), *extra],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r

def weights(run):
    return {n: load_file(Path(run, "adapters", n, "adapter_model.safetensors")) for n in ("summarization", "sql_generation")}

def test_two_processes_equal_one_with_the_same_global_batch(config, tmp_path):
    r2 = train(config, tmp_path/"two", 2, "--batch-size", "2")
    train(config, tmp_path/"one", 1, "--batch-size", "4")
    diff = compare_runs(tmp_path/"one", tmp_path/"two")
    for n in ("summarization", "sql_generation"): assert diff[f"relative ΔW difference {n}"] < 1e-4, diff
    w = weights(tmp_path/"two")
    assert any(v.abs().sum() > 0 for k, v in w["sql_generation"].items() if "lora_B" in k)     # it did train
    assert r2.stdout.count("adapters (PEFT layout)") == 1                                        # one summary, by rank 0
    assert sorted(p.name for p in (tmp_path/"two"/"checkpoints").iterdir()) == ["step-0000003", "step-0000006"]
    rows = [json.loads(l) for l in (tmp_path/"two"/"metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))                                        # logged once, not per rank
    one = [json.loads(l) for l in (tmp_path/"one"/"metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in one]                            # tokens summed over ranks
    assert [r["task"] for r in rows] == [r["task"] for r in one]

def test_two_process_resume_equals_uninterrupted(config, tmp_path):
    import shutil
    train(config, tmp_path/"full", 2, "--batch-size", "2")
    shutil.copytree(tmp_path/"full", tmp_path/"cut")          # what a run killed after step 3's checkpoint leaves behind
    shutil.rmtree(tmp_path/"cut"/"checkpoints"/"step-0000006"); shutil.rmtree(tmp_path/"cut"/"adapters")
    r = train(config, tmp_path/"cut", 2, "--batch-size", "2", "--resume")
    rows = [json.loads(l) for l in (tmp_path/"cut"/"metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == list(range(1, 7))
    a, b = weights(tmp_path/"full"), weights(tmp_path/"cut")
    for n in a:
        for k in a[n]: assert torch.allclose(a[n][k], b[n][k], atol=1e-6), (n, k)

def test_export_vllm_cli(config, tmp_path):
    train(config, tmp_path/"run", 1, "--batch-size", "4", "--max-steps", "2")
    cli = [sys.executable, "-m", "multilora", "export", "--format", "vllm", "--adapters", str(tmp_path/"run"/"adapters")]
    r = subprocess.run([*cli, "--out", str(tmp_path/"vllm")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    serve = (tmp_path/"vllm"/"serve.sh").read_text()
    assert "--enable-lora" in serve and "--max-lora-rank 32" in serve and "sql_generation=" in serve and "summarization=" in serve
    assert '"model": "sql_generation"' in (tmp_path/"vllm"/"request.sh").read_text()
    assert sorted(p.name for p in (tmp_path/"vllm"/"summarization").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    again = subprocess.run([*cli, "--out", str(tmp_path/"vllm")], capture_output=True, text=True)
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr
    cfg = tmp_path/"run"/"adapters"/"summarization"/"adapter_config.json"
    c = json.loads(cfg.read_text()); c["use_dora"] = True; cfg.write_text(json.dumps(c))
    bad = subprocess.run([*cli, "--out", str(tmp_path/"v2")], capture_output=True, text=True)
    assert bad.returncode == 2 and "summarization: use_dora=true" in bad.stderr and not (tmp_path/"v2").exists()

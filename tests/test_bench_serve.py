"`bench serve` against `multilora serve` in a process of its own, as a user runs it, beside the in-process server."
import pytest, torch
from multilora.bench import bench_serve
from multilora.server import ServerProcess
from _server_fixtures import adapter_root

def test_a_server_that_does_not_start_says_why(tmp_path):
    with pytest.raises(RuntimeError, match="did not start") as e:
        with ServerProcess(["--adapters", tmp_path / "missing"], start_timeout=300): pass
    assert "does not exist" in str(e.value)                     # the server's own words, from its output

def test_bench_serve_from_a_server_process_counts_what_the_clients_received():
    runs = {server: bench_serve(None, engines=("batched",), concurrency=(2,), max_new_tokens=4, requests_per_level=4,
                                max_batch_size=2, output=None, verbose=False, server=server)
            for server in ("thread", "process")}
    for server, res in runs.items():
        row = res["engines"]["batched"][0]
        assert res["config"]["server"] == server
        assert (row["requests"], row["errors"]) == (4, 0)
        assert round(row["tokens_per_s"] * row["wall_s"]) == 4 * 4      # marker adapters never stop: 4 tokens each
    assert runs["process"]["config"]["models"] == runs["thread"]["config"]["models"]
    assert "batched timing" not in runs["process"]["config"]             # no engine stats from another process

def test_bench_serve_refuses_what_it_cannot_pass_on():
    with pytest.raises(ValueError, match="server must be one of"): bench_serve(None, server="cluster")
    with pytest.raises(ValueError, match="loads the base in NF4"): bench_serve(None, server="process", quantization="none")

def test_the_outside_client_counts_what_a_real_server_sent(tmp_path, adapter_root):
    "tools/openai_load.py (httpx alone, no multilora import) against `multilora serve` in its own process."
    import json, subprocess, sys
    from pathlib import Path
    tool = Path(__file__).parents[1]/"tools"/"openai_load.py"
    assert "multilora" not in "".join(l for l in tool.read_text().splitlines() if l.startswith(("import", "from")))
    with ServerProcess(["--adapters", adapter_root/"serving", "--engine", "fast", "--max-batch-size", 4,
                        "--max-len", 128]) as url:
        out = tmp_path/"load.json"
        run = subprocess.run([sys.executable, tool, "--url", url, "--models", "alpha,beta,SmolLM2-135M-Instruct",
                              "--concurrency", "3", "--requests", "6", "--single", "2", "--max-tokens", "5",
                              "--prompt-words", "40", "--json", out], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    res = json.loads(out.read_text())
    for level, n in (("concurrent", 6), ("single", 2)):
        r = res[level]
        assert (r["requests"], r["errors"], r["completion_tokens"]) == (n, 0, 5 * n)   # ignore_eos: 5 tokens each
        assert r["tokens_per_s"] == round(5 * n / r["wall_s"], 1) and r["prompt_tokens_mean"] > 30
        t = r["server_timing"]                    # where the server says its time went during this level, from /health
        assert t["prefill_tokens"] == r["prompt_tokens_total"]               # the server prefilled what the client sent
        assert t["decode_steps"] >= 4 and t["decode_rows"] >= 4 * n          # 5 tokens each: the first from the prefill
        assert 0 < t["prefill_s"] + t["decode_s"] <= r["wall_s"]
    assert "concurrent: c=3" in run.stdout
    runtime = res["server"]["runtime"]                       # how the server says it ran the model, from /health
    assert runtime["frozen_weights"] == ("bnb_gemm" if torch.cuda.is_available() else "bnb")
    assert runtime["pipeline"] is True
    assert runtime["cuda_graphs"] is True if torch.cuda.is_available() else not runtime["cuda_graphs"]   # else the error

def test_bench_serve_from_a_server_process_with_an_adapters_folder(adapter_root):
    "The folder a user names, served by `multilora serve` in its own process, its adapters and the base all answered."
    res = bench_serve(adapter_root/"serving", engines=("batched",), concurrency=(3,), max_new_tokens=3,
                      requests_per_level=3, max_batch_size=3, output=None, verbose=False, server="process")
    row = res["engines"]["batched"][0]
    assert res["config"]["models"] == ["alpha", "beta", "SmolLM2-135M-Instruct"]
    assert not any(k.startswith("batched ") for k in res["config"])   # the batched engine reports no runtime of its own
    assert (row["requests"], row["errors"]) == (3, 0) and round(row["tokens_per_s"] * row["wall_s"]) == 3 * 3

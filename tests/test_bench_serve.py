"`bench serve` against `multilora serve` in a process of its own, as a user runs it, beside the in-process server."
import pytest
from multilora.bench import bench_serve
from multilora.server import ServerProcess

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

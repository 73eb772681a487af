"The `bnb_gemm` frozen path: per decode size, the fused 4-bit GEMM or dequantize + cuBLAS, against the model as loaded."
import json, pytest, torch
import torch.nn.functional as F
import bitsandbytes as bnb
from multilora.kernels import BnbGemm, _relative_error
from multilora.model import load_base_model
from multilora.runner import FastLoRA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' fused 4-bit GEMM needs a CUDA GPU")
PROMPTS = ["The capital of France is", "SELECT name FROM users WHERE", "Once upon a time", "def fibonacci(n):"]

def test_bnb_gemm_falls_back_off_a_gpu():
    base, _ = load_base_model(quantization="nf4", device_map="cpu")
    with pytest.warns(UserWarning, match=r"the 'bnb_gemm' NF4 path is unavailable \(RuntimeError: .*CUDA GPUs.*using 'torch'"):
        fast = FastLoRA(base, max_batch_size=2, max_len=64, frozen_weights="bnb_gemm")
    assert fast.frozen_weights == "torch"
    assert FastLoRA(base, max_batch_size=2, max_len=64).frozen_weights == "bnb"            # "auto" on a CPU, as before

@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("nested, bias", [(True, False), (False, True)])
def test_bnb_gemm_layer_matches_bitsandbytes(nested, bias, dtype):
    torch.manual_seed(0)
    lin = bnb.nn.Linear4bit(512, 384, bias=bias, compute_dtype=dtype, quant_type="nf4", compress_statistics=nested)
    lin.weight = bnb.nn.Params4bit(torch.randn(384, 512) * 0.02, requires_grad=False, quant_type="nf4",
                                   compress_statistics=nested)
    if bias: lin.bias = torch.nn.Parameter(torch.randn(384) * 0.1, requires_grad=False)
    lin = lin.cuda()
    assert lin.weight.quant_state.nested == nested
    op = BnbGemm(lin)
    w = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state).to(dtype)
    for rows in (1, 3, 4, 17, 32, 64):
        x = torch.randn(rows, 512, device="cuda", dtype=dtype)
        want = F.linear(x, w, None if lin.bias is None else lin.bias.to(dtype))
        for chunk in (64, 32, 16):
            got = op(x, chunk)
            assert got.shape == want.shape and got.dtype == dtype
            rel = _relative_error(got, want)
            assert rel <= 2 * torch.finfo(dtype).eps, f"{rows} rows in chunks of {chunk}: relative error {rel:.3g}"
    x = torch.randn(2, 3, 512, device="cuda", dtype=dtype)                       # leading dimensions, as the engine passes
    assert _relative_error(op(x), F.linear(x, w, None if lin.bias is None else lin.bias.to(dtype))) <= 2 * torch.finfo(dtype).eps

@cuda
def test_bnb_gemm_engine_matches_the_model_as_loaded():
    base, tok = load_base_model(quantization="nf4")                               # the embedded model, on the GPU
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    batch = [ids[i % len(ids)] for i in range(64)]                               # a decode step of 64 rows
    slots, adapters = list(range(64)), [-1] * 64
    logits = {}
    for mode in ("bnb", "dense", "bnb_gemm"):                    # "bnb": bitsandbytes' Linear4bit, the model as loaded
        fast = FastLoRA(base, max_batch_size=64, max_len=128, frozen_weights=mode)
        assert fast.frozen_weights == mode, f"{mode} fell back to {fast.frozen_weights}"
        prefill = fast.prefill([i[:-1] for i in batch], slots, adapters)
        tokens, positions = {s: batch[s][-1] for s in slots}, {s: len(batch[s]) - 1 for s in slots}
        step = fast.decode(tokens, positions, dict(enumerate(adapters)))[:64]
        one = fast.decode({0: tokens[0]}, {0: positions[0]}, {0: -1})[:1]
        if mode != "bnb": assert fast.graph_error is None, f"{mode}: {fast.graph_error}"   # decode steps were graphs
        logits[mode] = [prefill.float(), step.float(), one.float()]
        if mode == "bnb_gemm":
            path = fast.frozen_path
            print("choices:", path.choices, "\ntimings (µs):", path.timings)
            print("worst start-up check:", max(path.kernel_checks.values()))
            json.dumps({"choices": path.choices, "timings": path.timings, "checks": path.kernel_checks})
            shapes = {f"{m.weight.quant_state.shape[0]}x{m.weight.quant_state.shape[1]}" for m in path.nf4}
            for rows in (1, 64):
                chosen = {s: path.choices.get(f"{s} rows {rows}") for s in shapes}
                assert all(c in path.candidates for c in chosen.values()), f"{rows} rows: {chosen}"
            assert all(path.choices[f"{s} rows 1"] in ("fused", "gemv") for s in shapes), path.timings   # read NF4 only
            fused_at_64 = any(path.choices[f"{s} rows 64"] == "fused" for s in shapes)
        del fast
    rel = lambda a, b: ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()
    for what, got, dense, want in zip(("prefill", "decode at 64", "decode at 1"), logits["bnb_gemm"], logits["dense"],
                                      logits["bnb"]):
        # both are bf16 computations of the same NF4 model, so bnb_gemm may be about as far from it as dense is. Two
        # correct bf16 paths already differ by that much: on an H200 the prefill (which dequantizes on both paths)
        # measured 0.0315 for bnb_gemm against 0.0191 for dense, 1.65x. On an H100 dense came out bit for bit equal to
        # the model as loaded (0), while bnb_gemm's one-pass dequantization, one bf16 rounding step off on a few
        # weights, measured 0.0225; hence the floor. A wrong kernel is off by O(1).
        bound = max(2.5 * rel(dense, want), 5e-2)
        print(f"{what}: bnb_gemm {rel(got, want):.3g}, dense {rel(dense, want):.3g} from the model as loaded")
        assert rel(got, want) <= bound, (f"{what}: bnb_gemm differs from the model as loaded by {rel(got, want):.3g}, "
                                         f"more than {bound:.3g} (dense: {rel(dense, want):.3g}; "
                                         f"fused kernel at 64 rows: {fused_at_64})")

@cuda
def test_graphs_recaptured_after_the_weights_change():
    "Adapters reloaded, or 16-bit copies taken under a memory budget: the decode graphs are captured again, not lost."
    from multilora.nf4 import HybridPath
    base, tok = load_base_model(quantization="nf4")
    fast = FastLoRA(base, max_batch_size=8, max_len=128)                           # "auto": bnb_gemm on a GPU
    assert fast.frozen_weights == "bnb_gemm", fast.frozen_weights
    ids = tok(PROMPTS[0])["input_ids"]
    fast.prefill([ids[:-1]], [0], [-1])
    step = lambda: fast.decode({0: ids[-1]}, {0: len(ids) - 1}, {0: -1})[:1].float()
    before = step()
    fast.refresh_adapters()                                   # what loading or deleting an adapter does
    again = step()
    assert fast.graph_error is None and fast.graphs, fast.graph_error
    assert torch.equal(before, again)
    inner = fast.frozen_path
    fast.frozen_path = HybridPath(inner, 1e9)                 # the small model fits whole: every group in 16 bits
    fast.frozen_path.start()
    fast.drop_graphs()
    hybrid = step()
    assert fast.graph_error is None and fast.graphs, fast.graph_error
    assert sorted({g for _, g in fast.frozen_path.dense}) == ["down", "gate_up", "o", "qkv"]
    rel = ((hybrid - before).norm() / before.norm()).item()
    assert rel < 5e-2, f"16-bit copies moved the logits by {rel:.3g}"          # bf16 paths of the same weights

@cuda
def test_pipelined_decode_matches_steps_that_wait():
    "On a GPU, where a launched step runs while the host reads the last one: the tokens of steps that wait for theirs."
    from multilora.engine import BASE, GenRequest
    from multilora.scheduler import Scheduler
    base, tok = load_base_model(quantization="nf4")
    fast = FastLoRA(base, max_batch_size=8, max_len=128)
    results = {}
    for pipeline in (False, True):
        # 12 requests for 8 slots, all of one length: both ways admit, batch and retire alike, so every step runs the
        # same (B, L) graph both ways and greedy tokens must agree exactly
        sched, reqs = Scheduler(fast, tok, pipeline=pipeline), [GenRequest(p, BASE, 24, ignore_eos=True) for p in PROMPTS * 3]
        for r in reqs: sched.add(r)
        out = {}
        while sched.busy: out.update((r.id, res) for r, res in sched.step())
        results[pipeline] = [(out[r.id].text, out[r.id].completion_tokens) for r in reqs]
        assert sched.inflight is None and not sched.active
    assert fast.graph_error is None and fast.graphs, fast.graph_error
    assert fast.launches > 0
    assert results[True] == results[False]
    assert all(n == 24 for _, n in results[True])

@cuda
def test_prefill_graphs_match_eager_prefills_and_fail_alone():
    "Bucketed prefill graphs give the eager prefill's logits; a prefill capture that fails leaves decode graphs running."
    base, tok = load_base_model(quantization="nf4")
    fast = FastLoRA(base, max_batch_size=8, max_len=128)
    ids = [tok(p)["input_ids"] for p in PROMPTS[:3]]
    graphed = fast.prefill(ids, [0, 1, 2], [-1, -1, -1]).float()
    assert ("prefill", 4, 16) in fast.graphs and fast.prefill_graph_error is None, fast.prefill_graph_error
    fast.cuda_graphs = False
    eager = fast.prefill(ids, [0, 1, 2], [-1, -1, -1]).float()                  # at its own size, no graph
    fast.cuda_graphs = True
    rel = ((graphed - eager).norm(dim=-1) / eager.norm(dim=-1)).max().item()
    assert rel < 2e-2, f"a bucketed prefill graph differs from the eager prefill by {rel:.3g}"
    step = fast.decode({0: 5}, {0: len(ids[0])}, {0: -1}).clone()              # a decode graph exists from here
    real = fast._bucketed_prefill
    def broken(B, T):
        if torch.cuda.is_current_stream_capturing(): raise RuntimeError("simulated capture failure")
        return real(B, T)
    fast._bucketed_prefill = broken
    with pytest.warns(UserWarning, match="prefills run eagerly"):
        again = fast.prefill([ids[0] * 3], [3], [-1]).float()                    # a new bucket: (1, 32)
    assert fast.prefill_graph_error and fast.prefill_graph_tokens == 0 and fast.cuda_graphs
    assert fast.graph_error is None and any(len(k) == 2 for k in fast.graphs)   # decode graphs kept
    assert torch.isfinite(again).all()
    assert torch.equal(fast.decode({0: 5}, {0: len(ids[0])}, {0: -1}), step)

@cuda
def test_a_memory_budget_routes_small_steps_by_timing():
    "Under a memory budget, each copied shape's 1-, 2- and 4-row steps run from the copy or from NF4, whichever was timed faster."
    base, tok = load_base_model(quantization="nf4")
    fast = FastLoRA(base, max_batch_size=8, max_len=128, gpu_memory_budget=1.0)     # the small model fits whole
    path = fast.frozen_path
    shapes = {tuple(w.shape) for w, _ in path.dense.values()}
    timed = {(s, n): path.row_timings[f"{s[0]}x{s[1]} rows {n}"] for s in shapes for n in (1, 2, 4)}
    assert len(path.row_timings) == len(timed) and all(min(t.values()) > 0 for t in timed.values())
    assert path.nf4_rows == {k for k, t in timed.items() if t["nf4"] < t["16-bit"]}
    print({f"{s[0]}x{s[1]} rows {n}": t for (s, n), t in timed.items()})
    ids = tok(PROMPTS[0])["input_ids"]
    logits = {}
    for name, f in (("routed", fast), ("nf4", FastLoRA(base, max_batch_size=8, max_len=128))):
        f.prefill([ids[:-1]], [0], [-1])
        logits[name] = f.decode({0: ids[-1]}, {0: len(ids) - 1}, {0: -1})[:1].float()
    rel = ((logits["routed"] - logits["nf4"]).norm() / logits["nf4"].norm()).item()
    assert rel < 5e-2, f"the routed one-row step moved the logits by {rel:.3g}"     # bf16 paths of the same weights

def test_gpu_memory_budget_on_the_cpu():
    "The engine's `gpu_memory_budget` takes 16-bit copies of the heaviest groups on any device, and serves the same logits."
    base, tok = load_base_model(quantization="nf4", device_map="cpu")
    ids = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    logits = {}
    for budget in (None, 0.005, 1.0):
        fast = FastLoRA(base, max_batch_size=2, max_len=64, gpu_memory_budget=budget)
        logits[budget] = fast.prefill([i[:-1] for i in ids], [0, 1], [-1, -1]).float()
        if budget: assert fast.frozen_weights == "bnb+dense" and fast.frozen_path.dense_bytes <= budget * 1e9
    assert fast.frozen_path.dense_bytes > 0
    for budget in (0.005, 1.0): torch.testing.assert_close(logits[budget], logits[None], rtol=1e-4, atol=1e-3)

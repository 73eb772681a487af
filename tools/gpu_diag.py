"Diagnose the fast engine on a GPU: each NF4 path (bitsandbytes, plain torch, compiled, fused, dense), graph capture, step times, memory."
import faulthandler, gc, sys, time, torch, warnings
faulthandler.dump_traceback_later(int(sys.argv[2]) if len(sys.argv) > 2 else 300, exit=True)
from multilora.model import load_base_model
from multilora.adapters import load_adapters
from multilora.fast import FastLoRA
from multilora.engine import BASE
from multilora.bench import bench_prompts
base = sys.argv[1]
m, tok = load_base_model(base); model = load_adapters(m, "/tmp/diag_adapters"); model.eval()
print(f"model loaded: {torch.cuda.memory_allocated() / 2**30:.2f} GB", flush=True)
prompts = bench_prompts(tok, 128)
names = ["summarization", "sql_generation", BASE, "sql_generation"]
for mode in sys.argv[3].split(",") if len(sys.argv) > 3 else ("compiled", "torch", "bnb"):
    t0 = time.time()
    f = FastLoRA(model, max_batch_size=64, max_len=256, dequantize=mode); f.init_scheduler(tok)
    print(f"== {mode}: built in {time.time() - t0:.1f}s (dequantize={f.dequantize}); {torch.cuda.memory_allocated() / 2**30:.2f} GB",
          flush=True)
    if getattr(f, "kernel_checks", None):
        from multilora.kernels import _BEST
        print(f"  kernel checks (relative error): { {k: f'{v:.1e}' for k, v in f.kernel_checks.items()} }")
        print(f"  tuned tilings: { {k[:3]: str(v) for k, v in _BEST.items()} }", flush=True)
    for n, adapters in ((1, names), (64, names), (64, [BASE])):
        t0 = time.time()
        res = f.generate_texts([prompts[i % 4] for i in range(n)], [adapters[i % len(adapters)] for i in range(n)], max_new_tokens=64,
                               ignore_eos=True)
        torch.cuda.synchronize(); dt = time.time() - t0
        label = "mixed" if len(adapters) > 1 else "base only"
        print(f"  batch {n:>2} {label:<9}: {n * 64 / dt:7.0f} tok/s ({dt:.2f}s incl. prefill and capture), graphs={len(f.graphs)}, "
              f"graph_error={f.graph_error}, checks={ {k: f'{v:.1e}' for k, v in f.graph_checks.items()} }", flush=True)
    # steady state: decode steps alone at batch 64, once the graphs exist
    ids = [tok(p)["input_ids"] for p in prompts]
    f.prefill([ids[i % 4] for i in range(64)], list(range(64)), [i % 3 - 1 for i in range(64)])
    args = ({s: ids[s % 4][-1] for s in range(64)}, {s: len(ids[s % 4]) for s in range(64)}, {s: s % 3 - 1 for s in range(64)})
    f.decode(*args); torch.cuda.synchronize(); t0 = time.time()
    for _ in range(20): f.decode(*args)
    torch.cuda.synchronize(); ms = (time.time() - t0) / 20 * 1e3
    print(f"  decode step, batch 64: {ms:.2f} ms -> {64 / ms * 1e3:.0f} tok/s; peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GB",
          flush=True)
    one = ({0: args[0][0]}, {0: args[1][0]}, {0: 0})
    f.decode(*one); torch.cuda.synchronize(); t0 = time.time()
    for _ in range(20): f.decode(*one)
    torch.cuda.synchronize(); print(f"  decode step, batch 1: {(time.time() - t0) / 20 * 1e3:.2f} ms", flush=True)
    for B in (8, 64):   # a prefill of B prompts of 128 tokens, alone (no server around it)
        f.prefill([ids[i % 4] for i in range(B)], list(range(B)), [i % 3 - 1 for i in range(B)]); torch.cuda.synchronize(); t0 = time.time()
        for _ in range(3): f.prefill([ids[i % 4] for i in range(B)], list(range(B)), [i % 3 - 1 for i in range(B)])
        torch.cuda.synchronize(); dt = (time.time() - t0) / 3
        print(f"  prefill of {B} x {len(ids[0])} tokens: {dt * 1e3:.1f} ms -> {B * len(ids[0]) / dt:,.0f} prompt tokens/s", flush=True)
    if mode in ("compiled", "fused", "dense"):   # where an eager decode step's time goes (the graphs hide it; this says what they hide)
        from torch.profiler import profile, ProfilerActivity
        graphs, f.cuda_graphs = f.cuda_graphs, False
        f.decode(*args); torch.cuda.synchronize(); t0 = time.time(); f.decode(*args); torch.cuda.synchronize()
        print(f"  eager decode step, batch 64: {(time.time() - t0) * 1e3:.1f} ms", flush=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof: f.decode(*args); torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=50), flush=True)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(f"  eager decode step, batch 64: {len(kernels)} GPU kernels, {sum(e.device_time for e in kernels) / 1e3:.1f} ms of kernel time",
              flush=True)
        f.cuda_graphs = graphs
    print(f"  scheduler timing: { {k: round(v, 3) for k, v in f.timing.items()} }, decode steps {f.steps}", flush=True)
    del f; gc.collect(); torch.cuda.empty_cache()

"Diagnose the fast engine on a GPU: graph capture, scheduler timing, and the HTTP path (with a stack dump if anything hangs)."
import faulthandler, sys, time, torch, warnings
faulthandler.dump_traceback_later(int(sys.argv[2]) if len(sys.argv) > 2 else 150, exit=True)
from multilora.model import load_base_model
from multilora.adapters import load_adapters
from multilora.fast import FastLoRA
from multilora.server import BASE, bench_prompts, bench_serve
base = sys.argv[1]
m, tok = load_base_model(base); model = load_adapters(m, "/tmp/diag_adapters"); model.eval()
f = FastLoRA(model, max_batch_size=64, max_len=256); f.init_scheduler(tok)
prompts = bench_prompts(tok, 128)
names = ["summarization", "sql_generation", BASE, "sql_generation"]
for n in (1, 64):
    t0 = time.time()
    res = f.generate_texts([prompts[i % 4] for i in range(n)], [names[i % 4] for i in range(n)], max_new_tokens=32, ignore_eos=True)
    torch.cuda.synchronize(); dt = time.time() - t0
    print(f"batch {n}: {n * 32 / dt:.0f} tok/s, {dt:.2f}s, graphs={sorted(f.graphs)}, graph_error={f.graph_error}", flush=True)
t0 = time.time(); res = f.generate_texts([prompts[i % 4] for i in range(64)], [names[i % 4] for i in range(64)], max_new_tokens=32, ignore_eos=True)
torch.cuda.synchronize(); dt = time.time() - t0; print(f"batch 64 again: {64 * 32 / dt:.0f} tok/s", flush=True)
bench_serve("/tmp/diag_adapters", engines=("fast",), concurrency=(64,), max_new_tokens=32, requests_per_level=64, max_batch_size=64,
            base_model=base, output=None, prompt_tokens=128, engine_kw={"fast": {"max_len": 256}})

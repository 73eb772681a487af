"Where a prefill's time goes in the fast engine: prefill calls of growing size on a 4-block slice of a 7B-shaped model (a side investigation)."
import sys, time, torch
from multilora.bench import SHAPES, random_model, random_adapters
from multilora.model import load_base_model
from multilora.adapters import load_adapters
from multilora.fast import FastLoRA
import os
SHAPES["llama-2-7b-4blocks"] = {**SHAPES[os.environ.get("PREFILL_SHAPE", "llama-2-7b")], "num_hidden_layers": 4}
sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
path = random_model("llama-2-7b-4blocks", os.environ.get("PREFILL_DIR", "/tmp/l7b4"), tokenizer=".devtok")
random_adapters(path, os.environ.get("PREFILL_DIR", "/tmp/l7b4") + "-adapters")
m, tok = load_base_model(str(path)); model = load_adapters(m, os.environ.get("PREFILL_DIR", "/tmp/l7b4") + "-adapters"); model.eval()
for mode in sys.argv[1].split(","):
    f = FastLoRA(model, max_batch_size=64, max_len=256, dequantize=mode)
    for B in (1, 8, 32, 63):
        prompts, slots, adapters = [[5] * 130] * B, list(range(B)), [b % 3 - 1 for b in range(B)]
        f.prefill(prompts, slots, adapters); sync()
        t0 = time.perf_counter()
        for _ in range(3): f.prefill(prompts, slots, adapters)
        sync(); dt = (time.perf_counter() - t0) / 3
        print(f"{mode} prefill B={B:>2} x 130 tokens: {dt * 1e3:7.1f} ms for 4 blocks -> x8 for 32 blocks = {dt * 8e3:6.0f} ms; "
              f"{B * 130 / dt:8.0f} tok/s", flush=True)
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])) as prof: f.prefill(prompts, slots, adapters); sync()
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total", row_limit=12, max_name_column_width=60), flush=True)

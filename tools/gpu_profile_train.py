"Where a training step's time goes on a GPU: step times for a few shapes, then a torch.profiler table of one step."
import sys, time, torch
from dataclasses import replace
from torch.profiler import profile, ProfilerActivity
from multilora.model import load_base_model
from multilora.adapters import attach_adapters, activate_adapter, adapter_parameters
from multilora.data import builtin_tasks, IGNORE_INDEX
from multilora.model import prepare_for_training
from multilora.train import TrainConfig, _device_settings

base, tok = load_base_model(sys.argv[1])
tasks = builtin_tasks()
tasks = [replace(tasks[0], r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
         replace(tasks[1], r=32, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])]
model = attach_adapters(base, tasks, verbose=False)
mp, gc = _device_settings(TrainConfig(), "cuda")
print("mixed precision", mp, "| gradient checkpointing", gc, "| attn", model.config._attn_implementation, flush=True)
prepare_for_training(model, gradient_checkpointing=gc)
params = [p for t in tasks for p in adapter_parameters(model, t.name).values()]
for p in params: p.requires_grad_(True)
opt = torch.optim.AdamW(params, lr=1e-4)
print("trainable", sum(p.numel() for p in params), "dtypes", {str(p.dtype) for p in params}, flush=True)
model.train()

def step(B, T, task=1, parts=None):
    ids = torch.randint(3, 30000, (B, T), device="cuda"); lab = ids.clone(); lab[:, : T // 2] = IGNORE_INDEX
    activate_adapter(model, tasks[task].name)
    torch.cuda.synchronize(); t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=lab).loss
    torch.cuda.synchronize(); t1 = time.perf_counter()
    loss.backward()
    torch.cuda.synchronize(); t2 = time.perf_counter()
    opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize(); t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2

def timed(B, T, n=3, label=""):
    step(B, T)
    r = [step(B, T) for _ in range(n)]
    f, b, o = (sum(x[i] for x in r) / n for i in range(3))
    print(f"{label:<12} B={B:<3} T={T:<4} tokens={B*T:<6} fwd {f*1e3:7.1f} ms  bwd {b*1e3:7.1f} ms  opt {o*1e3:6.1f} ms  "
          f"total {(f+b+o)*1e3:7.1f} ms  -> {B*T/(f+b+o):8.0f} tok/s", flush=True)

for B, T in [(16, 136), (16, 512), (64, 136), (4, 512), (1, 136)]: timed(B, T, label="gc on")
model.gradient_checkpointing_disable(); model.config.use_cache = False
for B, T in [(16, 136), (64, 136)]: timed(B, T, label="gc off")
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
    ids = torch.randint(3, 30000, (16, 136), device="cuda")
    for _ in range(2): model(input_ids=ids)
    torch.cuda.synchronize(); t0 = time.perf_counter(); model(input_ids=ids); torch.cuda.synchronize()
    print(f"no-grad forward B=16 T=136: {(time.perf_counter() - t0)*1e3:.1f} ms", flush=True)
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
step(16, 136)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof: step(16, 136)
ka = prof.key_averages()
print(ka.table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=60))
print(ka.table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))

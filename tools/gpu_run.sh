#!/usr/bin/env bash
# The GPU runs behind the committed benchmark tables (nbs/benchmarks/*_h200.json), as run through the `device` tool.
# Usage (repo root, with the wheels of ../shared/device-wheels.sh in .whl/ and a tokenizer folder in .devtok/):
#   bash tools/gpu_run.sh STAGE...    stages: cudatest kernels serve servefast train ddp diag profile
# Results go to $OUT (or ./gpu-out). No hub is reachable there: every model is random weights of a real shape.
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1 MULTILORA_CACHE=/tmp/mlcache
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft, bitsandbytes; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', bitsandbytes.__version__)" | tee -a "$OUT/gpu.txt"
ml() { python3 -m multilora "$@"; }
model() { [ -f "/tmp/$1/config.json" ] || ml bench model --shape "$1" --out "/tmp/$1" --tokenizer .devtok; }
for stage in "$@"; do
  echo "=== $stage $(date -u +%H:%M:%S)"
  case $stage in
    cudatest)  # the notebooks' GPU cells, on a random model of the embedded model's shape
      model smollm2-135m
      MULTILORA_MODEL=/tmp/smollm2-135m nbdev_test --flags cuda --n_workers 1 --file_re "${CUDATEST_RE:-^07[ab]_.*\.ipynb$}" 2>&1 | tee "$OUT/cudatest.txt" ;;
    kernels)   # one NF4 layer of each 7B projection shape, four ways, at decode sizes
      ml bench kernels --shape ${KERNEL_SHAPE:-llama-2-7b} --rows 1,16,32,64 --json "$OUT/kernels_h200.json" 2>&1 | tee "$OUT/kernels.log" ;;
    serve|servefast)  # serve: the engines side by side; servefast: the fast engine with adapters against base-only, same engine
      model llama-2-7b
      [ -d /tmp/adapters7b ] || ml bench adapters --base /tmp/llama-2-7b --out /tmp/adapters7b
      if [ "$stage" = servefast ]; then args="--engines fast --base-only --dequantize ${DEQUANTIZE:-auto}"; name=serve_fast_h200${DEQUANTIZE:+_$DEQUANTIZE}${SUFFIX:-}; waves=${WAVES:-5}
      else args="--engines ${ENGINES:-locked,batched,fast} --locked-max-concurrency 8"; name=serve_h200; waves=${WAVES:-2}; fi   # locked: ~4 s a request
      ml bench serve --base /tmp/llama-2-7b --adapters /tmp/adapters7b $args --concurrency ${CONC:-1,8,32,64} --max-new-tokens 64 \
        --prompt-tokens 128 --max-batch-size 64 --max-len 256 ${REQUESTS:+--requests $REQUESTS} --waves $waves --clients ${CLIENTS:-process} --json "$OUT/$name.json" 2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUT/$name.log" ;;
    train)
      model llama-2-7b
      ml bench train --base /tmp/llama-2-7b --steps ${STEPS:-20} --batch-size 16 --json "$OUT/train_h200.json" 2>&1 | grep --line-buffered -v "Loading weights\|tokenizing" | tee "$OUT/train.log" ;;
    ddp)       # 2 GPUs against 1 with the same global batch
      model llama-3.2-1b
      cat > /tmp/ddp.toml <<TOML
model = "/tmp/llama-3.2-1b"
[train]
max_steps = ${DDP_STEPS:-10}
learning_rate = 1e-4
max_length = 512
group_by_length = true
checkpoint_every = 20
progress = false
seed = 0
[[tasks]]
preset = "summarization"
data = "builtin:summarization"
lora_dropout = 0.0
[[tasks]]
preset = "sql_generation"
data = "builtin:sql_generation"
lora_dropout = 0.0
TOML
      rm -rf /tmp/ddp1 /tmp/ddp2
      accelerate launch --multi_gpu --num_processes 2 --mixed_precision bf16 -m multilora train --config /tmp/ddp.toml --batch-size 8 --output-dir /tmp/ddp2 2>&1 | grep --line-buffered -v "Loading weights\|tokenizing" | tail -8
      accelerate launch --num_processes 1 --mixed_precision bf16 -m multilora train --config /tmp/ddp.toml --batch-size 16 --output-dir /tmp/ddp1 2>&1 | grep --line-buffered -v "Loading weights\|tokenizing" | tail -8
      ls /tmp/ddp2/checkpoints /tmp/ddp2/adapters
      python3 -c "
import json; from multilora.scaling import compare_runs
r = {'model': 'llama-3.2-1b shape, random weights, NF4, bf16', 'global_batch': 16, 'steps': ${DDP_STEPS:-10}, **compare_runs('/tmp/ddp1', '/tmp/ddp2')}
r['scaling_1_to_2_gpus'] = round(r['tokens_per_s ddp2'] / r['tokens_per_s ddp1'], 2)
print(json.dumps(r, indent=1)); open('$OUT/ddp_h200.json', 'w').write(json.dumps(r, indent=1))" ;;
    diag)
      model ${DIAG_SHAPE:-smollm2-135m}
      [ -d /tmp/diag_adapters ] || ml bench adapters --base /tmp/${DIAG_SHAPE:-smollm2-135m} --out /tmp/diag_adapters
      python3 tools/gpu_diag.py /tmp/${DIAG_SHAPE:-smollm2-135m} ${DIAG_TIMEOUT:-300} ${DIAG_MODES:-compiled,torch,bnb} 2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUT/diag.log" ;;
    profile)   # where a training step's time goes
      model llama-2-7b
      python3 tools/gpu_profile_train.py /tmp/llama-2-7b 2>&1 | grep --line-buffered -v "Loading weights" | tee "$OUT/profile_train.log" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"

"Which part of the fused NF4 matmul costs what: variants of the kernel timed on a 7B model's shapes (a side investigation)."
import itertools, sys, time, torch, triton, triton.language as tl
import torch.nn.functional as F
import bitsandbytes as bnb
from multilora.fast import nf4_dequantize
from multilora.kernels import NF4Matmul, KernelConfig, tune, _time, _BEST

@triton.jit
def _nf4(q):
    return tl.where(q < 8, tl.where(q < 4, tl.where(q < 2, tl.where(q < 1, -1.0, -0.6961928009986877), tl.where(q < 3, -0.5250730514526367, -0.39491748809814453)), tl.where(q < 6, tl.where(q < 5, -0.28444138169288635, -0.18477343022823334), tl.where(q < 7, -0.09105003625154495, 0.0))), tl.where(q < 12, tl.where(q < 10, tl.where(q < 9, 0.07958029955625534, 0.16093020141124725), tl.where(q < 11, 0.24611230194568634, 0.33791524171829224)), tl.where(q < 14, tl.where(q < 13, 0.44070982933044434, 0.5626170039176941), tl.where(q < 15, 0.7229568362236023, 1.0))))

@triton.jit
def _v(x_ptr, w_ptr, s_ptr, code_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_ys,
       BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
       MODE: tl.constexpr):
    # MODE 1: scale per block as a vector, gather code; 2: + scale after the dot; 3: where-tree instead of gather (scale before);
    # 4: no lookup at all (wrong values: the cost floor of loads and dots)
    pid_n, pid_m, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, BLOCKSIZE // 2)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(pid_s * BLOCK_K, K, BLOCK_K * SPLIT_K):
        for g in tl.static_range(BLOCK_K // BLOCKSIZE):
            kb = k0 + g * BLOCKSIZE
            kk = kb + 2 * rj
            xmask = (rm[:, None] < M) & (kk[None, :] < K)
            x_even = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=xmask, other=0.0)
            x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] + 1, mask=xmask, other=0.0)
            wmask = (rn[:, None] < N) & (kk[None, :] < K)
            byte = tl.load(w_ptr + rn[:, None] * (K // 2) + kk[None, :] // 2, mask=wmask, other=0).to(tl.int32)
            s = tl.load(s_ptr + rn * (K // BLOCKSIZE) + kb // BLOCKSIZE, mask=(rn < N) & (rn * 0 + kb < K), other=0.0)
            hi, lo = byte >> 4, byte & 15
            if MODE == 4:
                c_hi, c_lo = hi.to(tl.float32), lo.to(tl.float32)
            elif MODE == 3:
                c_hi, c_lo = _nf4(hi), _nf4(lo)
            else:
                c_hi, c_lo = tl.load(code_ptr + hi), tl.load(code_ptr + lo)
            if MODE == 2:
                p = tl.dot(x_even, tl.trans(c_hi.to(x_ptr.dtype.element_ty))) + tl.dot(x_odd, tl.trans(c_lo.to(x_ptr.dtype.element_ty)))
                acc += p * s[None, :]
            else:
                acc += tl.dot(x_even, tl.trans((c_hi * s[:, None]).to(x_ptr.dtype.element_ty)))
                acc += tl.dot(x_odd, tl.trans((c_lo * s[:, None]).to(x_ptr.dtype.element_ty)))
    y = y_ptr + pid_s * stride_ys + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _j(x_ptr, w_ptr, s_ptr, code_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_ys,
       BLOCKSIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
       MODE: tl.constexpr):
    # MODE 5: interleave hi/lo with join, one dot per quant block, where-tree lookup; 6: the same with a gather lookup;
    # 7: GEMV without tensor cores (elementwise products, sum over K), where-tree
    pid_n, pid_m, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rj = tl.arange(0, BLOCKSIZE // 2)
    rk = tl.arange(0, BLOCKSIZE)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(pid_s * BLOCK_K, K, BLOCK_K * SPLIT_K):
        for g in tl.static_range(BLOCK_K // BLOCKSIZE):
            kb = k0 + g * BLOCKSIZE
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kb + rk[None, :], mask=(rm[:, None] < M) & (kb + rk[None, :] < K), other=0.0)
            byte = tl.load(w_ptr + rn[:, None] * (K // 2) + kb // 2 + rj[None, :], mask=(rn[:, None] < N) & (kb + 2 * rj[None, :] < K), other=0).to(tl.int32)
            s = tl.load(s_ptr + rn * (K // BLOCKSIZE) + kb // BLOCKSIZE, mask=(rn < N) & (rn * 0 + kb < K), other=0.0)
            if MODE == 6:
                hi, lo = tl.load(code_ptr + (byte >> 4)), tl.load(code_ptr + (byte & 15))
            else:
                hi, lo = _nf4(byte >> 4), _nf4(byte & 15)
            w = tl.join(hi * s[:, None], lo * s[:, None]).reshape(BLOCK_N, BLOCKSIZE).to(x_ptr.dtype.element_ty)
            if MODE == 7:
                acc += tl.sum(x[:, None, :].to(tl.float32) * w[None, :, :].to(tl.float32), axis=2)
            else:
                acc += tl.dot(x, tl.trans(w))
    y = y_ptr + pid_s * stride_ys + rm[:, None] * stride_ym + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(rm[:, None] < M) & (rn[None, :] < N))

def run(op, x, mode, bn, bk, sk, nw, ns):
    M = x.shape[0]; bm = max(16, triton.next_power_of_2(M)) if mode != 7 else max(1, triton.next_power_of_2(M))
    kern = _v if mode < 5 else _j
    out = torch.empty((sk, M, op.out_features), device=x.device, dtype=x.dtype if sk == 1 else torch.float32)
    grid = (triton.cdiv(op.out_features, bn), triton.cdiv(M, bm), sk)
    kern[grid](x, op.packed, op.scales, op.code, out, M, op.out_features, op.in_features, x.stride(0), out.stride(1), out.stride(0),
             BLOCKSIZE=op.blocksize, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, MODE=mode, num_warps=nw, num_stages=ns)
    return out[0] if sk == 1 else out.sum(0).to(x.dtype)

if __name__ != '__main__': raise SystemExit
MODES = [int(m) for m in sys.argv[1].split(',')] if len(sys.argv) > 1 else [3, 5, 6, 7]
torch.manual_seed(0)
configs = [(32, 64, 1, 4, 3), (32, 256, 1, 4, 3), (64, 64, 1, 4, 3), (64, 256, 1, 4, 3), (32, 64, 4, 4, 3), (64, 64, 4, 4, 3),
           (64, 256, 4, 4, 3), (128, 128, 1, 8, 3), (128, 128, 2, 8, 3)]
for N, K in ((11008, 4096), (4096, 11008), (4096, 4096)):
    lin = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(N, K, dtype=torch.bfloat16) * 0.02, requires_grad=False, quant_type="nf4")
    lin = lin.cuda(); op = NF4Matmul(lin); w16 = nf4_dequantize(lin.weight).to(torch.bfloat16)
    for M in (1, 16, 64):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        want = F.linear(x, w16).float()
        line = f"{N}x{K} M={M:>2}: bnb {_time(lambda: lin(x))*1e6:6.1f} 16bit {_time(lambda: F.linear(x, w16))*1e6:6.1f}"
        for mode in MODES:
            best = None
            if mode == 7 and M > 16: continue
            for c in configs:
                try:
                    got = run(op, x, mode, *c).float()
                    t = _time(lambda: run(op, x, mode, *c), reps=10)
                except Exception as e: err = e; continue
                rel = ((got - want).norm() / want.norm()).item()
                if best is None or t < best[0]: best = (t, c, rel)
            line += f" | v{mode} {best[0]*1e6:6.1f} {best[1]} rel {best[2]:.0e}" if best else f" | v{mode} failed: {err}"[:200]
        print(line, flush=True)

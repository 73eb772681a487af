"A soak test: a few hundred requests over mixed adapters, no 5xx, stable memory."
import asyncio, resource, gc
import httpx
from _server_fixtures import adapter_root, loaded, make_server

def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"): return int(line.split()[1]) / 1024
    return 0.0

def test_soak(make_server, loaded):
    url, eng = make_server("batched", max_batch_size=16)
    models = ["alpha", "beta", loaded[2]]
    async def wave(n, offset):
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=32)) as c:
            sem = asyncio.Semaphore(16)
            async def one(i):
                async with sem:
                    m = models[i % 3]
                    if i % 5 == 0:
                        return await c.post("/v1/chat/completions", json={"model": m, "messages": [{"role": "user", "content": f"Hi {i}"}], "max_tokens": 2, "temperature": 0})
                    return await c.post("/v1/completions", json={"model": m, "prompt": f"Request {i}", "max_tokens": 2, "temperature": 0})
            return await asyncio.gather(*[one(offset + i) for i in range(n)])
    first = asyncio.run(wave(60, 0))   # warm-up wave: allocator caches fill
    gc.collect(); before = rss_mb()
    rest = asyncio.run(wave(240, 60))
    gc.collect(); after = rss_mb()
    codes = [r.status_code for r in first + rest]
    assert len(codes) == 300 and all(c == 200 for c in codes), {c: codes.count(c) for c in set(codes)}
    for i, r in enumerate(first + rest):
        m = models[i % 3]
        if m != loaded[2]:
            body = r.json()["choices"][0]
            assert (body.get("text") or body.get("message", {}).get("content")) == f" {m} {m}"
    assert after - before < 300, (before, after)
    assert httpx.get(url + "/health").json()["status"] == "ok"

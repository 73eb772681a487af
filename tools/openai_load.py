#!/usr/bin/env python3
"""A load client for any OpenAI-compatible server, independent of multilora (httpx alone), to check the project's
`bench serve` from outside.

It sends what the serving issue's outside client sent: a warm-up wave, then `--requests` completions at
`--concurrency`, then `--single` requests one at a time; every request has a prompt of about `--prompt-words` words,
`--max-tokens` new tokens with `ignore_eos`, temperature 0, and a model taken in turn from `--models` (adapters and
the base, mixed). Tokens are counted from each answer's `usage.completion_tokens`; wall time is the client's own.

    python tools/openai_load.py --url http://127.0.0.1:8000 --models sql,summarization,base --json load.json
"""
import argparse, asyncio, json, statistics, time
import httpx

FILLER = "The notes go on with more details about the plan for the week and the people who will come along."

def prompt(i: int, words: int) -> str:
    "A distinct prompt of about `words` words (distinct, so no server-side cache can answer for another)."
    text = f"Request {i}: summarize what follows. "
    while len(text.split()) < words: text += FILLER + " "
    return " ".join(text.split()[:words])

async def level(url: str, models: list[str], concurrency: int, n: int, max_tokens: int, words: int, start: int = 0) -> dict:
    "`concurrency` workers send `n` requests in all; what the client saw."
    latencies, tokens, prompt_tokens, errors, todo = [], 0, [], [], iter(range(start, start + n))
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=httpx.Limits(max_connections=concurrency + 4)) as c:
        async def worker():
            nonlocal tokens
            for i in todo:
                body = {"model": models[i % len(models)], "prompt": prompt(i, words), "max_tokens": max_tokens,
                        "temperature": 0, "ignore_eos": True}
                t0 = time.perf_counter()
                r = await c.post("/v1/completions", json=body)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                latencies.append(time.perf_counter() - t0)
                usage = r.json()["usage"]
                tokens += usage["completion_tokens"]
                prompt_tokens.append(usage["prompt_tokens"])
        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20, method="inclusive") if len(latencies) > 1 else latencies * 19
    return {"concurrency": concurrency, "requests": len(latencies), "errors": len(errors), "first_error": errors[:1],
            "wall_s": round(wall, 3), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "p95_s": round(q[18], 3) if latencies else None,
            "prompt_tokens_mean": round(statistics.mean(prompt_tokens), 1) if prompt_tokens else None,
            "prompt_tokens_total": sum(prompt_tokens)}

def health(url: str) -> dict:
    "The server's /health, or the error that stopped it (a server need not have one)."
    try: return httpx.get(f"{url}/health", timeout=30).json()
    except (httpx.HTTPError, ValueError) as e: return {"error": repr(e)}

def measured(url: str, run) -> dict:
    "`run()`'s level, with where the server says its time went meanwhile (the change in /health's `timing`, if it has one)."
    before = health(url).get("timing") or {}
    row = run()
    after = health(url).get("timing") or {}
    if before and after: row["server_timing"] = {k: round(after[k] - before.get(k, 0), 4) for k in after}
    return row

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--models", required=True, help="comma-separated model names, taken in turn")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--single", type=int, default=6, help="requests sent one at a time after the concurrent level")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=100, help="the embedded model's tokenizer made 120 words into about 130 tokens")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    models = a.models.split(",")
    run = lambda c, n, start: asyncio.run(level(a.url, models, c, n, a.max_tokens, a.prompt_words, start))
    warm = run(a.concurrency, a.concurrency, 10_000)
    res = {"url": a.url, "models": models, "warm_up": warm,
           "concurrent": measured(a.url, lambda: run(a.concurrency, a.requests, 0)),
           "single": measured(a.url, lambda: run(1, a.single, 20_000))}
    res["server"] = health(a.url)                    # multilora says there how it ran the model
    for k in ("concurrent", "single"):
        r = res[k]
        print(f"{k:>10}: c={r['concurrency']:<3} {r['tokens_per_s']:8.1f} tok/s  p50 {r['p50_s']}s  p95 {r['p95_s']}s  "
              f"errors {r['errors']}  prompt tokens {r['prompt_tokens_mean']}", flush=True)
        if "server_timing" in r: print(f"{'':>10}  server: {r['server_timing']}", flush=True)
    if isinstance(res["server"], dict) and res["server"].get("runtime"): print("server runtime:", res["server"]["runtime"])
    if a.json: json.dump(res, open(a.json, "w"), indent=1)

if __name__ == "__main__": main()

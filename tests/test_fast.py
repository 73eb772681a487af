"The fast engine behind a real server: answers equal to each adapter alone, limits, and failures that stay contained."
import asyncio, time
import httpx, pytest, torch
from _server_fixtures import adapter_root, loaded, make_server
from multilora.engine import GenRequest, generate_rows, BASE

def complete(url, model, prompt="Hi", max_tokens=4, **kw):
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}, timeout=300)

def test_greedy_matches_peft_generate_under_load(make_server, loaded):
    "Concurrent mixed requests of different lengths: each answer is the one peft's generate gives that adapter alone."
    model, tok, name, _ = loaded
    url, eng = make_server("fast", max_batch_size=4)          # fewer slots than requests: requests wait, join and leave
    prompts = ["The capital of France is", "Once upon a time", "List three colours:", "def add(a, b):"]
    bodies = [{"model": m, "prompt": p, "max_tokens": n, "temperature": 0}
              for m, p, n in zip([name, "alpha", name, "beta", name, name], prompts + prompts[:2], [5, 3, 8, 2, 6, 4])]
    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            return await asyncio.gather(*[c.post("/v1/completions", json=b) for b in bodies])
    rs = asyncio.run(go())
    for b, r in zip(bodies, rs):
        assert r.status_code == 200, r.text
        adapter = BASE if b["model"] == name else b["model"]
        alone = generate_rows(model, tok, [GenRequest(b["prompt"], adapter, b["max_tokens"])])[0]
        assert r.json()["choices"][0]["text"] == alone.text, (b, r.json(), alone)
    assert eng.scheduler.active == {} and not eng.scheduler.waiting

def test_too_long_for_the_cache_is_a_400(make_server):
    url, _ = make_server("fast", max_len=64)
    r = complete(url, "alpha", prompt="word " * 40, max_tokens=40)
    assert r.status_code == 400 and "max_len=64" in r.json()["error"]["message"]
    assert complete(url, "alpha", max_tokens=2).json()["choices"][0]["text"] == " alpha alpha"

@pytest.mark.parametrize("pipeline", [True, False])
def test_a_failing_step_fails_only_its_requests(make_server, pipeline):
    url, eng = make_server("fast", max_batch_size=4, pipeline=pipeline)
    real, calls = eng.runner._step, []                               # the decode step itself, pipelined or not
    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 1: raise torch.cuda.OutOfMemoryError("simulated out of memory")
        return real(*a, **kw)
    eng.runner._step = flaky
    r = complete(url, "alpha", max_tokens=3)
    assert r.status_code == 500 and "Traceback" not in r.text
    assert eng.scheduler.active == {} and eng.scheduler.inflight is None     # its slot was freed, no step is pending
    assert complete(url, "beta", max_tokens=3).json()["choices"][0]["text"] == " beta beta beta"
    assert len(calls) > 1 and eng.runner.launches > 0 if pipeline else eng.runner.launches == 0

def test_unsupported_model_is_a_clear_error(loaded):
    from multilora.runner import FastLoRA
    model, *_ = loaded
    cfg = model.get_base_model().config
    old = cfg.model_type
    try:
        cfg.model_type = "gpt2"
        with pytest.raises(NotImplementedError, match="engine='batched'"): FastLoRA(model)
    finally: cfg.model_type = old

def test_a_failing_prefill_fails_only_its_requests(make_server):
    url, eng = make_server("fast", max_batch_size=4)
    real, calls = eng.runner.prefill, []
    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) == 1: raise RuntimeError("simulated prefill failure")
        return real(*a, **kw)
    eng.runner.prefill = flaky
    r = complete(url, "alpha", max_tokens=3)                     # answered (500), not left waiting forever
    assert r.status_code == 500 and eng.scheduler.active == {}
    assert complete(url, "beta", max_tokens=3).json()["choices"][0]["text"] == " beta beta beta"

def test_a_burst_answers_each_request_when_its_own_last_step_ends(make_server):
    "Steps run in bursts on the model thread, but a short request is answered after its own last step, not at the burst's end."
    url, eng = make_server("fast", max_batch_size=4, burst_s=600.0)        # one burst covers the whole run
    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            async def ask(n):
                r = await c.post("/v1/completions", json={"model": "alpha", "prompt": "Hi", "max_tokens": n, "temperature": 0})
                return r, eng.scheduler.steps                                   # decode steps run when the answer arrived
            return await asyncio.gather(ask(2), ask(40))
    (short, steps_short), (long, steps_long) = asyncio.run(go())
    assert short.json()["choices"][0]["text"] == " alpha alpha" and long.json()["usage"]["completion_tokens"] == 40
    assert steps_long >= 39 and steps_short < steps_long / 2, (steps_short, steps_long)
    assert eng.scheduler.active == {} and not eng.scheduler.waiting

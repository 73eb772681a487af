"Hostile and unusual inputs against real uvicorn servers on 127.0.0.1: every one is a clear 4xx, and nothing changes."
import gc, http.client, json, shutil
import httpx, pytest, torch
from safetensors.torch import load_file, save_file
from peft import PeftModel
from _server_fixtures import adapter_root, bare, loaded, make_server

def post(url, path, body, timeout=120):
    "POST `body` as ASCII JSON, so lone surrogates travel as `\\ud800` escapes, as a hostile client sends them."
    return httpx.post(url + path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"},
                      timeout=timeout)

def complete(url, model, prompt="Hi", max_tokens=3, **kw):
    return post(url, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw})

def listed(url): return [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]

def answers(url): return {m: complete(url, m).json()["choices"][0]["text"] for m in ("alpha", "beta")}

def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS"))

def tensor_mb() -> float:
    "MB held by live tensors (each storage once): what a load that failed must not leave behind, exactly."
    gc.collect()
    storages = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type != "meta":
            s = o.untyped_storage()
            storages[(s.device, s.data_ptr())] = s.nbytes()
    return sum(storages.values()) / 2**20

def memory() -> tuple[float, float]: return tensor_mb(), rss_mb()

def assert_nothing_left(before: tuple[float, float], what: str):
    """No tensor a failed load made is still alive, and the process did not grow by much (RSS moves with the allocator's
    arenas in a long test process, so it only guards against a gross leak; live tensors are the exact check)."""
    (tensors, rss), (tensors_now, rss_now) = before, memory()
    assert tensors_now - tensors < 1, f"{what} left {tensors_now - tensors:.1f} MB of tensors behind"
    assert rss_now - rss < 200, f"{what} grew the process by {rss_now - rss:.0f} MB"

def bad_adapter(root, name, config=None, weights=None, raw_config=None, raw_weights=None):
    "A copy of marker adapter gamma under `root/bad/name`, its config patched and/or its weights replaced."
    p = root/"bad"/name
    shutil.rmtree(p, ignore_errors=True)
    shutil.copytree(root/"extra"/"gamma", p)
    cfg = json.loads((p/"adapter_config.json").read_text())
    if config is not None: (p/"adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if raw_config is not None: (p/"adapter_config.json").write_text(raw_config)
    if weights is not None: save_file(weights(load_file(p/"adapter_model.safetensors")), p/"adapter_model.safetensors")
    if raw_weights is not None: (p/"adapter_model.safetensors").write_bytes(raw_weights)
    return f"bad/{name}"

H = "base_model.model.lm_head."
def _rename(w, old, new): return {k.replace(old, new): v for k, v in w.items()}

# (case, lora_name, how to build the folder (or a raw path), the words the 400's message must hold)
BAD_ADAPTERS = [
    ("nul in path", "g", lambda r: "extra/gam\0ma", "NUL"),
    ("5000-char path", "g", lambda r: "a" * 5000, "over 4096"),
    ("over-long name part", "g", lambda r: "a" * 300, "cannot be read"),
    ("surrogate in path", "g", lambda r: "extra/\ud800", "cannot be read"),
    ("config not JSON", "g", lambda r: bad_adapter(r, "notjson", raw_config="{r: 1,"), "not valid JSON"),
    ("config {}", "g", lambda r: bad_adapter(r, "empty", raw_config="{}"), '"peft_type": "LORA"'),
    ("config a list", "g", lambda r: bad_adapter(r, "list", raw_config="[1]"), '"peft_type": "LORA"'),
    ("r = 10**9", "g", lambda r: bad_adapter(r, "huge_r", {"r": 10**9}), "need [1000000000, 576]"),
    ("r = 0", "g", lambda r: bad_adapter(r, "zero_r", {"r": 0}), "r must be a positive int"),
    ("other architecture", "g", lambda r: bad_adapter(r, "bloom", {"target_modules": ["query_key_value"]}), "match no module"),
    ("wrong shape 576 -> 4096", "g",
     lambda r: bad_adapter(r, "wide", weights=lambda w: {**w, H + "lora_A.weight": torch.zeros(1, 4096)}), "has shape [1, 4096]"),
    ("no matching keys", "g",
     lambda r: bad_adapter(r, "nokeys", weights=lambda w: _rename(w, "lm_head", "nothing")), "maps to no module"),
    ("keys without peft's prefix", "g",
     lambda r: bad_adapter(r, "noprefix", weights=lambda w: _rename(w, "base_model.model.", "")), "maps to no module"),
    ("rank mismatch", "g", lambda r: bad_adapter(r, "rank", {"r": 8192}), "need [8192, 576]"),
    ("weights of an untargeted module", "g", lambda r: bad_adapter(r, "untargeted", {"target_modules": ["q_proj"]}),
     "target_modules leaves out"),
    ("a bias the config does not ask for", "g", lambda r: bad_adapter(r, "bias", {"lora_bias": False}), "lora_bias false"),
    ("weights not safetensors", "g", lambda r: bad_adapter(r, "garbage", raw_weights=b"\xff" * 64), "cannot be read"),
    ("no weights", "g", lambda r: bad_adapter(r, "noweights", weights=lambda w: {}), "holds no weights"),
    ("name a.b", "a.b", lambda r: "extra/gamma", "Invalid adapter name 'a.b'"),
    ("name default", "default", lambda r: "extra/gamma", "reserved by peft"),
    ("base model's name", "SmolLM2-135M-Instruct", lambda r: "extra/gamma", "names the base model"),
    ("__base__", "__base__", lambda r: "extra/gamma", "names the base model"),
    ("surrogate name", "g\ud800", lambda r: "extra/gamma", "Invalid adapter name"),
]

def test_bad_adapters_are_refused_and_change_nothing(make_server, adapter_root):
    url, eng = make_server("batched")
    before, said = listed(url), answers(url)
    for _ in range(2): post(url, "/v1/load_lora_adapter", {"lora_name": "g", "lora_path": bad_adapter(adapter_root, "warm", {"r": 8192})})
    before_bad = memory()
    for case, name, path, words in BAD_ADAPTERS:
        r = post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path(adapter_root)})
        assert r.status_code == 400, (case, r.status_code, r.text)
        assert words in r.json()["error"]["message"], (case, r.text)
        assert listed(url) == before and eng.adapters == ["alpha", "beta"], case
    assert_nothing_left(before_bad, "a refused adapter")
    assert answers(url) == said == {"alpha": " alpha alpha alpha", "beta": " beta beta beta"}
    # and a good adapter still loads under the name the bad ones asked for
    assert post(url, "/v1/load_lora_adapter", {"lora_name": "g", "lora_path": "extra/gamma"}).status_code == 200
    assert complete(url, "g").json()["choices"][0]["text"] == " gamma gamma gamma"
    assert post(url, "/v1/unload_lora_adapter", {"lora_name": "g"}).status_code == 200

def test_failed_load_is_rolled_back(make_server, adapter_root):
    "A folder that passes the checks but leaves a weight peft cannot place: peft registers it, the engine deletes it again."
    url, eng = make_server("batched")
    path = bad_adapter(adapter_root, "dora", weights=lambda w: {**w, H + "lora_magnitude_vector.weight": torch.ones(49152)})
    r = post(url, "/v1/load_lora_adapter", {"lora_name": "dora", "lora_path": path})
    assert r.status_code == 400 and "could not place" in r.json()["error"]["message"], r.text
    assert "dora" not in listed(url) and eng.adapters == ["alpha", "beta"]
    assert complete(url, "dora").status_code == 404
    assert answers(url) == {"alpha": " alpha alpha alpha", "beta": " beta beta beta"}
    assert not any(n.endswith(".dora") or ".dora." in n for n, _ in eng.model.named_parameters())

# r=512 on 59 modules (~115 MB of LoRA weights), then rank 0 for the last k_proj: peft fails after wrapping all the others
FAILS_LATE = {"r": 512, "target_modules": ["q_proj", "k_proj", "lm_head"],
              "rank_pattern": {"lm_head": 1, "layers.29.self_attn.k_proj": 0}}

def test_first_adapter_on_a_bare_base_is_all_or_nothing(make_server, bare, adapter_root):
    "The first load wraps the bare base in peft; failing after that, it leaves the server exactly as it was."
    model, base = bare[0], bare[2]
    url, eng = make_server("batched", served=bare)
    def layout(): return ({n: type(m).__name__ for n, m in model.named_modules()},
                          {n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters()}, sorted(model.__dict__))
    before, said = layout(), complete(url, base).json()["choices"][0]["text"]
    assert listed(url) == [base] and eng.adapters == []
    unplaced = lambda w: {**w, H + "lora_magnitude_vector.weight": torch.ones(49152)}
    cases = [(bad_adapter(adapter_root, "late", FAILS_LATE), "positive integer value"),
             (bad_adapter(adapter_root, "unplaced", weights=unplaced), "could not place")]
    for path, _ in cases: post(url, "/v1/load_lora_adapter", {"lora_name": "first", "lora_path": path})   # warm-up
    before_loads = memory()
    for _ in range(2):
        for path, words in cases:
            r = post(url, "/v1/load_lora_adapter", {"lora_name": "first", "lora_path": path})
            assert r.status_code == 400 and words in r.json()["error"]["message"], (path, r.text)
            assert listed(url) == [base] and eng.adapters == [] and eng.model is model
            assert not isinstance(eng.model, PeftModel)
            assert layout() == before, path                  # no module left wrapped, no peft_config on the base
    assert_nothing_left(before_loads, "a failed first load")
    assert complete(url, base).json()["choices"][0]["text"] == said and complete(url, "first").status_code == 404
    # and a good first adapter still loads, next to the base as it was
    assert post(url, "/v1/load_lora_adapter", {"lora_name": "first", "lora_path": "extra/gamma"}).status_code == 200
    assert listed(url) == [base, "first"] and isinstance(eng.model, PeftModel)
    assert complete(url, "first").json()["choices"][0]["text"] == " gamma gamma gamma"
    assert complete(url, base).json()["choices"][0]["text"] == said

def test_bad_adapter_on_the_fast_engine(make_server, adapter_root):
    url, eng = make_server("fast")
    for name, path in [("w", bad_adapter(adapter_root, "wide2", weights=lambda w: {**w, H + "lora_A.weight": torch.zeros(1, 4096)})),
                       ("a.b", "extra/gamma")]:
        assert post(url, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}).status_code == 400
    assert listed(url)[1:] == ["alpha", "beta"] and eng.runner.names == ["alpha", "beta"]
    assert answers(url) == {"alpha": " alpha alpha alpha", "beta": " beta beta beta"}

SURROGATE = [
    ("/v1/completions", {"model": "alpha", "prompt": "Hi \ud800", "max_tokens": 2}),
    ("/v1/completions", {"model": "alpha", "prompt": ["ok", "\ud800"], "max_tokens": 2}),
    ("/v1/completions", {"model": "alpha", "prompt": "Hi", "stop": ["\udfff"], "max_tokens": 2}),
    ("/v1/chat/completions", {"model": "beta", "messages": [{"role": "user", "content": "\ud800"}], "max_tokens": 2}),
    ("/v1/chat/completions", {"model": "beta", "messages": [{"role": "user", "content": "\ud800"}], "stream": True}),
    ("/generate", {"prompt": "\ud800", "task_name": "alpha"}),
]

def test_lone_surrogates_are_a_400(make_server):
    url, _ = make_server("batched")
    for path, body in SURROGATE:
        r = post(url, path, body)
        assert r.status_code == 400 and "lone surrogate" in r.json()["error"]["message"], (path, body, r.text)
    r = post(url, "/v1/completions", {"model": "\ud800", "prompt": "Hi"})   # echoed in the message: still valid JSON
    assert r.status_code == 404 and "\\ud800" in r.json()["error"]["message"]
    assert answers(url) == {"alpha": " alpha alpha alpha", "beta": " beta beta beta"}

@pytest.mark.parametrize("engine", ["batched", "fast"])
def test_tiny_temperature_is_greedy(make_server, loaded, engine):
    url, _ = make_server(engine)
    for model in ("alpha", loaded[2]):
        greedy = complete(url, model, "Once upon a time", max_tokens=5)
        tiny = complete(url, model, "Once upon a time", max_tokens=5, temperature=1e-38)
        assert tiny.status_code == 200, tiny.text
        assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]

def test_a_500_keeps_the_connection(make_server):
    "After a 500 the same keep-alive connection serves the next request (uvicorn closes it when the app re-raises)."
    url, eng = make_server("batched")
    real = eng.generate_rows
    def flaky(model, tok, reqs):
        if any("BOOM" in r.prompt for r in reqs): raise RuntimeError("secret internal detail")
        return real(model, tok, reqs)
    eng.generate_rows = flaky
    conn = http.client.HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=60)
    def ask(prompt):
        conn.request("POST", "/v1/completions", json.dumps({"model": "alpha", "prompt": prompt, "max_tokens": 2, "temperature": 0}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    status, body = ask("BOOM")
    sock = conn.sock
    assert status == 500 and body["error"]["message"] == "Internal server error"
    status, body = ask("Hi")
    assert status == 200 and body["choices"][0]["text"] == " alpha alpha" and conn.sock is sock
    conn.close()

def test_openai_prompt_forms(make_server, loaded):
    from openai import OpenAI
    url, _ = make_server("batched")
    tok = loaded[1]
    client = OpenAI(base_url=url + "/v1", api_key="x")
    ids = tok("Question 1?")["input_ids"]
    one = client.completions.create(model="beta", prompt="Question 1?", max_tokens=2, temperature=0)
    for prompt in (ids, [ids, ids], ["Question 1?", "Question 1?", "Question 1?"]):
        c = client.completions.create(model="beta", prompt=prompt, max_tokens=2, temperature=0)
        n = 1 if prompt is ids else len(prompt)
        assert [ch.index for ch in c.choices] == list(range(n)) and {ch.text for ch in c.choices} == {" beta beta"}
        assert c.usage.prompt_tokens == n * one.usage.prompt_tokens and c.usage.completion_tokens == 2 * n
    for body, words in [({"prompt": []}, "empty list"), ({"prompt": [[]]}, "non-empty"), ({"prompt": [[len(tok)]]}, "ids in [0,"),
                        ({"prompt": [-1]}, "ids in [0,"), ({"prompt": ["a", 1]}, "prompt"), ({"prompt": ["x"] * 65}, "at most 64"),
                        ({"prompt": ["a", "b"], "stream": True}, "stream takes one prompt")]:
        r = post(url, "/v1/completions", {"model": "alpha", "max_tokens": 2, **body})
        assert r.status_code == 400 and words in r.json()["error"]["message"], (body, r.text)

NOT_HONOURED = [
    ("/v1/completions", {"logprobs": 21}, "less than or equal to 20"),
    ("/v1/completions", {"logprobs": 1, "stream": True}, "echo and logprobs need stream: false"),
    ("/v1/completions", {"echo": True, "stream": True}, "echo and logprobs need stream: false"),
    ("/v1/completions", {"frequency_penalty": 0.5}, "frequency_penalty: not supported"),
    ("/v1/completions", {"logit_bias": {"50": 100}}, "logit_bias: not supported"),
    ("/v1/completions", {"best_of": 3}, "best_of: not supported"),
    ("/v1/completions", {"suffix": "x"}, "suffix: not supported"),
    ("/v1/completions", {"frobnicate": 1}, "Extra inputs are not permitted"),
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "needs stream"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 2}, "logprobs, top_logprobs: not supported"),
    ("/v1/chat/completions", {"presence_penalty": 1}, "presence_penalty: not supported"),
    ("/v1/chat/completions", {"tools": []}, "Extra inputs are not permitted"),
    ("/generate", {"logprobs": 2}, "logprobs: not supported"),
]

def test_parameters_not_honoured_are_refused(make_server):
    url, _ = make_server("batched")
    base = {"/v1/completions": {"model": "alpha", "prompt": "Hi", "max_tokens": 2},
            "/v1/chat/completions": {"model": "alpha", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            "/generate": {"task_name": "alpha", "prompt": "Hi", "max_new_tokens": 2}}
    for path, extra, words in NOT_HONOURED:
        r = post(url, path, {**base[path], **extra})
        assert r.status_code == 400 and words in r.json()["error"]["message"], (path, extra, r.text)
    # the values that ask for nothing, as many clients send them by default, are fine
    noop = {"logprobs": None, "echo": False, "frequency_penalty": 0, "presence_penalty": 0.0, "best_of": 1, "logit_bias": {}}
    r = post(url, "/v1/completions", {**base["/v1/completions"], **noop, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == " alpha alpha"

def test_models_retrieve_usage_and_generate_keys(make_server, loaded):
    from openai import OpenAI, NotFoundError
    url, _ = make_server("batched")
    client = OpenAI(base_url=url + "/v1", api_key="x")
    assert client.models.retrieve("alpha").id == "alpha" and client.models.retrieve("alpha").parent == loaded[2]
    assert client.models.retrieve(loaded[2]).parent is None
    with pytest.raises(NotFoundError): client.models.retrieve("nope")
    assert httpx.get(url + "/v1/models/__base__").status_code == 404
    for stream in (client.completions.create(model="alpha", prompt="Hi", max_tokens=3, stream=True, stream_options={"include_usage": True}),
                   client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                                  stream=True, stream_options={"include_usage": True})):
        chunks = list(stream)
        assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens == 3 and chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 3
    plain = list(client.completions.create(model="alpha", prompt="Hi", max_tokens=2, stream=True))
    assert all(c.choices for c in plain)     # without include_usage: no usage chunk
    g = post(url, "/generate", {"prompt": "Hi", "task_name": "beta", "max_new_tokens": 2}).json()
    assert (g["task"], g["result"]) == ("beta", " beta beta") and (g["task_name"], g["text"]) == (g["task"], g["result"])

def test_openapi_documents_the_real_responses(make_server):
    url, _ = make_server("batched")
    schema = httpx.get(url + "/openapi.json").json()
    assert "422" not in json.dumps(schema) and "HTTPValidationError" not in schema["components"]["schemas"]
    assert "ErrorBody" in schema["components"]["schemas"]
    comp = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "500", "503"} <= set(comp)
    assert comp["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "text/event-stream" in comp["200"]["content"] and "application/json" in comp["200"]["content"]
    assert "text/plain" in schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "text/plain" in schema["paths"]["/v1/load_lora_adapter"]["post"]["responses"]["200"]["content"]
    assert "/v1/models/{model_id}" in schema["paths"]
    r = post(url, "/v1/completions", {"model": "alpha"})     # what the schema says a 400 looks like, it looks like
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "code"}
    for extra in ({"stream": 0}, {"seed": False}, {"temperature": True}, {"max_tokens": 2.5}):   # the schema's types, strictly
        r = post(url, "/v1/completions", {"model": "alpha", "prompt": "Hi", **extra})
        assert r.status_code == 400, (extra, r.text)
    for r in (httpx.get(url + "/nope"), httpx.get(url + "/v1/models/a%0Ab"), httpx.delete(url + "/v1/models")):
        assert r.status_code in (404, 405) and set(r.json()["error"]) == {"message", "type", "code"}, r.text

@pytest.mark.parametrize("engine", ["batched", "fast"])
def test_logprobs_and_echo(make_server, loaded, engine):
    "lm-evaluation-harness's loglikelihood request (token ids, echo, logprobs=1, one new token) and a plain top-k request."
    from openai import OpenAI
    url, _ = make_server(engine)
    tok, base = loaded[1], loaded[2]
    client = OpenAI(base_url=url + "/v1", api_key="x")
    ctx, cont = tok("Question:")["input_ids"], tok(" alpha")["input_ids"]
    split = tok("Hel", add_special_tokens=False)["input_ids"] + tok("lo", add_special_tokens=False)["input_ids"]
    assert split != tok("Hello")["input_ids"]        # not the canonical ids of its text: echo must score these, as sent
    c = client.completions.create(model="alpha", prompt=[ctx + cont, split, ctx + cont], max_tokens=1, temperature=0,
                                  logprobs=1, echo=True)
    assert [ch.index for ch in c.choices] == [0, 1, 2]
    for ch, sent in zip(c.choices, [ctx + cont, split, ctx + cont]):
        lp = ch.logprobs
        assert len(lp.tokens) == len(sent) + 1 and lp.tokens[:-1] == [tok.decode([i]) for i in sent]
        assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
        assert lp.tokens[-1] == " alpha" and lp.token_logprobs[-1] > -1e-3      # the marker's word, almost certain
    scored = c.choices[0].logprobs
    cont_lp = scored.token_logprobs[len(ctx):-1]                                 # what the harness sums
    assert len(cont_lp) == 1 and cont_lp[0] > -1e-3 and cont_lp[0] == max(scored.top_logprobs[len(ctx)].values())
    on_base = client.completions.create(model=base, prompt=[ctx + cont], max_tokens=1, temperature=0, logprobs=1, echo=True)
    assert on_base.choices[0].logprobs.token_logprobs[len(ctx)] < -5             # the base model finds " alpha" unlikely
    top = client.completions.create(model="beta", prompt="Hi", max_tokens=2, temperature=0, logprobs=3)
    lp = top.choices[0]
    assert top.choices[0].text == " beta beta" and lp.logprobs.tokens == [" beta", " beta"]
    assert all(len(t) == 3 and list(t)[0] == " beta" for t in lp.logprobs.top_logprobs)
    echo = client.completions.create(model="beta", prompt="Hi", max_tokens=2, temperature=0, echo=True)
    assert echo.choices[0].text == "Hi beta beta" and echo.choices[0].logprobs is None

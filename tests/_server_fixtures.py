"Shared fixtures for the server tests: one NF4 model with marker adapters, real uvicorn servers on 127.0.0.1."
import os, shutil, pytest
os.environ.setdefault("MULTILORA_CACHE", "/tmp/mlcache")
from multilora.model import load_tokenizer
from multilora.engine import load_for_serving, make_engine
from multilora.server import create_app, BackgroundServer
from multilora.testing import marker_adapters

@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    tok = load_tokenizer()
    marker_adapters(tok, root/"serving", {"alpha": " alpha", "beta": " beta"})
    marker_adapters(tok, root/"extra", {"gamma": " gamma"})
    return root

@pytest.fixture(scope="session")
def loaded(adapter_root):
    return load_for_serving(adapter_root/"serving")   # model, tokenizer, base name, templates

@pytest.fixture
def bare():
    "A fresh bare base model (no adapters, not a peft model), for one test: loading an adapter changes it."
    return load_for_serving(None)

@pytest.fixture
def make_server(loaded, adapter_root):
    "Start a server with an engine of our choice, on `served` (else alpha and beta's model); stops and drains it after."
    servers = []
    def start(engine="batched", app_kw=None, served=None, **engine_kw):
        model, tok, name, templates = served or loaded
        eng = make_engine(model, tok, engine, base_name=name, **engine_kw)
        srv = BackgroundServer(create_app(eng, **{"adapter_root": adapter_root, **(app_kw or {})}))
        url = srv.__enter__(); servers.append(srv)
        return url, eng
    yield start
    for s in servers: s.__exit__(None, None, None)

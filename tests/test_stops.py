"""A trained adapter's greedy answer ends where its training answers ended: on one of the model's stop tokens, with no
text after the answer, through the Python API and through a real server on loopback, on every engine.

The task is chosen so that the test can fail: its prompts are not chat turns, so the base model, left alone, runs on
into another `###` block. Only an adapter that learned to end on a token that generation stops on gives `"stop"`.
An adapter trained on any other end token (the fault this guards against) runs to the token budget instead."""
import os
os.environ.setdefault("MULTILORA_CACHE", "/tmp/mlcache")
import httpx, pytest, torch
from datasets import Dataset, DatasetDict
from multilora.model import load_base_model, generate, stop_token_ids
from multilora.adapters import PromptTemplate, Task, attach_adapters, save_adapters
from multilora.train import MultiLoRATrainer, TrainConfig
from multilora.engine import load_for_serving, make_engine
from multilora.server import BackgroundServer, create_app

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Greece", "Athens"),
            ("Poland", "Warsaw"), ("Canada", "Ottawa")]
TEMPLATE = PromptTemplate(prompt="### Country:\n{country}\n\n### Capital:\n", completion="The capital is {capital}.")
MAX_NEW = 24

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "A small adapter trained to answer in one short sentence, saved; the model it was trained on."
    out = tmp_path_factory.mktemp("stops")
    rows = [{"country": c, "capital": k} for c, k in CAPITALS]
    task = Task("capitals", TEMPLATE, DatasetDict({"train": Dataset.from_list(rows)}), r=8, lora_alpha=16,
                lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"])
    torch.manual_seed(0)
    model, tok = load_base_model(device_map="cpu")
    model = attach_adapters(model, [task], verbose=False)
    cfg = TrainConfig(output_dir=str(out/"run"), max_steps=40, batch_size=4, learning_rate=2e-3, eval_every=None,
                      checkpoint_every=1000, progress=False, seed=0)
    trainer = MultiLoRATrainer(model, tok, [task], cfg)
    trainer.train()
    model = trainer.unwrapped
    save_adapters(model, out/"adapters", [task])
    return model, tok, out/"adapters", rows

def test_trained_answers_stop_in_python(trained):
    model, tok, _, rows = trained
    model.set_adapter("capitals"); model.eval()
    prompts = [TEMPLATE.render_prompt(r) for r in rows]
    texts, finish = generate(model, tok, prompts, max_new_tokens=MAX_NEW, return_finish=True)
    assert finish == ["stop"] * len(rows), list(zip(texts, finish))
    assert texts == [TEMPLATE.render_completion(r) for r in rows]   # the answer, and nothing after it
    with model.disable_adapter():   # the base model on the same prompts does not stop: the check above can fail
        _, base_finish = generate(model, tok, prompts[:4], max_new_tokens=MAX_NEW, return_finish=True)
    assert base_finish.count("length") >= 3, base_finish

def test_trained_answers_stop_on_a_held_out_input(trained):
    model, tok, _, _ = trained
    model.set_adapter("capitals")
    text, finish = generate(model, tok, [TEMPLATE.render_prompt({"country": "Portugal"})], max_new_tokens=MAX_NEW,
                            return_finish=True)
    assert finish == ["stop"] and text[0].startswith("The capital is ") and "\n" not in text[0], (text, finish)

@pytest.mark.parametrize("engine", ["batched", "locked", "fast"])
def test_trained_answers_stop_through_the_server(trained, engine):
    model, tok, adapters, rows = trained
    model.set_adapter("capitals")
    prompts = [TEMPLATE.render_prompt(r) for r in rows[:4]] + [TEMPLATE.render_prompt({"country": "Portugal"})]
    want = generate(model, tok, prompts, max_new_tokens=MAX_NEW)
    served, stok, name, _ = load_for_serving(adapters)
    assert stop_token_ids(served) == stop_token_ids(model) and stok.eos_token_id in stop_token_ids(served)
    eng = make_engine(served, stok, engine, base_name=name)
    with BackgroundServer(create_app(eng)) as url:
        for p, w in zip(prompts, want):
            r = httpx.post(f"{url}/v1/completions", timeout=300,
                           json={"model": "capitals", "prompt": p, "max_tokens": MAX_NEW, "temperature": 0})
            choice = r.json()["choices"][0]
            assert (choice["finish_reason"], choice["text"]) == ("stop", w), (engine, p, choice)

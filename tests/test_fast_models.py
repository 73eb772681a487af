"The fast engine on the other decoder families it claims (Qwen2, with q/k/v biases; Mistral), against peft, on every CPU path."
import pytest, torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
from multilora.adapters import Task, attach_adapters
from multilora.runner import FastLoRA
from multilora.model import load_base_model, load_tokenizer

FAMILIES = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}
PROMPTS = ["The capital of France is", "SELECT name FROM users WHERE", "Once upon a time"]

@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    "A tiny random model of the family in NF4 on the CPU, with two adapters (one with a LoRA bias) whose B matrices are not zero."
    Config, Model = FAMILIES[request.param]
    tok = load_tokenizer()
    cfg = Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Model(cfg)
    if request.param == "qwen2":   # Qwen2's q, k and v carry biases; make them visible
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("proj.bias"): p.normal_(0, 0.5)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path); tok.save_pretrained(path)
    base, tok = load_base_model(str(path), quantization="nf4", device_map="cpu")
    assert base.config.model_type == request.param
    peft_model = attach_adapters(base, [
        Task("small", None, r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
        Task("large", None, r=8, lora_alpha=8, lora_dropout=0.0, lora_kwargs={"lora_bias": True},
             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])], verbose=False)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n: p.normal_(0, 0.1)
    return request.param, peft_model.eval(), tok

def peft_alone(model, ids, name):
    "peft's logits for one prompt with one adapter (None: the bare base)."
    with torch.no_grad():
        if name is None:
            with model.disable_adapter(): return model(input_ids=torch.tensor([ids])).logits[0, -1]
        model.set_adapter(name); return model(input_ids=torch.tensor([ids])).logits[0, -1]

@pytest.mark.parametrize("frozen_weights", ["bnb", "torch", "dense"])
def test_mixed_batch_matches_peft(family, frozen_weights):
    kind, model, tok = family
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    names = ["small", "large", None]
    fast = FastLoRA(model, max_batch_size=4, max_len=128, frozen_weights=frozen_weights)
    assert fast.frozen_weights == frozen_weights
    adapters = [fast.names.index(n) if n else -1 for n in names]
    got = fast.prefill(ids, [0, 1, 2], adapters)
    want = torch.stack([peft_alone(model, i, n) for i, n in zip(ids, names)])
    assert (got - want).abs().max() < 1e-3 * want.abs().max(), f"{kind}/{frozen_weights}: {(got - want).abs().max():.3g}"
    # a decode step from a cache filled by all but the last token gives the same logits
    fast.prefill([i[:-1] for i in ids], [0, 1, 2], adapters)
    step = fast.decode({s: ids[s][-1] for s in range(3)}, {s: len(ids[s]) - 1 for s in range(3)}, dict(enumerate(adapters)))
    assert (step[:3] - got).abs().max() < 1e-3 * got.abs().max()

def test_biases_are_in_the_model_and_in_the_stacks(family):
    kind, model, tok = family
    fast = FastLoRA(model, max_batch_size=2, max_len=64, frozen_weights="dense")
    frozen_bias = fast.frozen_path.grouped[(0, "qkv")][1]
    assert (frozen_bias is not None) == (kind == "qwen2")                 # Qwen2's q/k/v biases, in the group's one matrix
    assert all(st["qkv"].bias is not None and st["down"].bias is not None for st in fast.stacks)   # "large"'s LoRA biases

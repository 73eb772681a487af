"""Tests for `multilora.merge` on the embedded model, with small seeded random adapters (no training run needed).

Covered: the fp32 tolerance test (merged vs the unmerged adapter on the same base), loading the merged folder with
transformers alone while `import peft` fails, refusing to overwrite, an unknown adapter name, and an adapter that
does not fit the base. The NF4 comparison and the latency table live in nbs/06_merging.ipynb (NF4 on CPU is slow).
"""
import shutil
import pytest
import torch
from safetensors.torch import load_file, save_file
from multilora.model import load_base_model, generate
from multilora.adapters import attach_adapters, save_adapters, load_adapters, summarization_task, adapter_parameters
from multilora.merge import (merge_adapter, verify_merge, check_adapter, generate_without_peft, sample_prompts,
                             format_report, MERGE_TOLERANCE)

NAME = "summarization"


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    "One rank-16 q/v adapter on the embedded model, with non-zero (seeded random) B matrices."
    d = tmp_path_factory.mktemp("adapters")
    m, _ = load_base_model(quantization="none", compute_dtype=torch.float32, device_map="cpu")
    m = attach_adapters(m, [summarization_task()], verbose=False)
    g = torch.Generator().manual_seed(0)
    for k, p in adapter_parameters(m, NAME).items():
        if "lora_B" in k: p.data = torch.randn(p.shape, generator=g) * 0.01
    return save_adapters(m, d, tasks=[summarization_task()])


@pytest.fixture(scope="module")
def merged_dir(adapters_dir, tmp_path_factory):
    return merge_adapter(None, adapters_dir, NAME, tmp_path_factory.mktemp("out") / "merged", dtype="fp32")


def test_tolerance(merged_dir, adapters_dir):
    "merged fp32 model vs the unmerged adapter on the fp32 base: logits within 1e-3, same greedy text"
    r = verify_merge(merged_dir, adapters_dir, NAME, nf4=False, max_new_tokens=8)
    print(format_report(r))
    assert r["tolerance"] == MERGE_TOLERANCE[torch.float32] == 1e-3
    assert r["passed"] and r["max_abs_diff"] <= 1e-3
    assert r["greedy_match"] == r["prompts"]


def test_loads_without_peft(merged_dir, adapters_dir):
    "the merged folder loads with transformers alone (peft blocked) and generates what base + adapter generates"
    assert not list(merged_dir.glob("adapter_*"))
    prompt = sample_prompts(adapters_dir, NAME)[0]
    plain = generate_without_peft(merged_dir, prompt, max_new_tokens=8)
    m, tok = load_base_model(quantization="none", compute_dtype=torch.float32, device_map="cpu")
    assert plain == generate(load_adapters(m, adapters_dir, [NAME]), tok, [prompt], max_new_tokens=8)[0]


def test_refuses_to_overwrite(merged_dir, adapters_dir, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in merged_dir.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        merge_adapter(None, adapters_dir, NAME, merged_dir)
    assert {p.name: p.stat().st_mtime_ns for p in merged_dir.iterdir()} == before
    other = tmp_path / "notes"; other.mkdir(); (other / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a model folder"):
        merge_adapter(None, adapters_dir, NAME, other, overwrite=True)
    assert (other / "todo.txt").read_text() == "keep me"


def test_unknown_name(adapters_dir, tmp_path):
    with pytest.raises(ValueError, match=r"Unknown adapter 'sql'.*\['summarization'\]"):
        merge_adapter(None, adapters_dir, "sql", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mismatched_adapter(adapters_dir, tmp_path):
    "an adapter for a model with hidden size 1024 fails before anything is loaded or written"
    wrong = tmp_path / "wrong"
    shutil.copytree(adapters_dir / NAME, wrong / NAME)
    sd = load_file(wrong / NAME / "adapter_model.safetensors")
    save_file({k: torch.zeros(v.shape[0], 1024) if ".lora_A." in k else v for k, v in sd.items()},
              wrong / NAME / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"does not match the base.*1024 -> \d+ features, the base layer 576"):
        check_adapter(None, wrong, NAME)
    with pytest.raises(ValueError, match="does not match the base"):
        merge_adapter(None, wrong, NAME, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_dtype(adapters_dir, tmp_path):
    with pytest.raises(ValueError, match="valid options are auto, bf16"):
        merge_adapter(None, adapters_dir, NAME, tmp_path / "out", dtype="int4")

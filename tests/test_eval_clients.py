"Real evaluation clients against a real server on 127.0.0.1: lm-evaluation-harness (local-completions), schemathesis."
import json, os, subprocess, sys
from xml.etree import ElementTree
import httpx, pytest
from multilora.model import embedded_model_path
from _server_fixtures import adapter_root, loaded, make_server

def offline_env(tmp_path) -> dict:
    "The environment for a client run: no hub, caches under `tmp_path`."
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_DATASETS_CACHE": str(tmp_path/"hf_datasets"), "LMEVAL_LOG_LEVEL": "WARNING"}

def write_tasks(folder) -> str:
    "Two lm-eval tasks on local JSON files, one `generate_until` and one `multiple_choice` (loglikelihood); the folder."
    folder.mkdir(parents=True, exist_ok=True)
    docs = [{"question": f"What does the marker say, {i}?", "answer": " alpha alpha alpha",
             "choices": ["alpha", "beta"] if i % 2 else ["beta", "alpha"], "gold": 1 - i % 2} for i in range(8)]
    (folder/"docs.json").write_text(json.dumps(docs))
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder/'docs.json'}\ntest_split: test\n"
    (folder/"multilora_gen.yaml").write_text(
        "task: multilora_gen\n" + data + "output_type: generate_until\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_target: answer\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 3\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (folder/"multilora_choice.yaml").write_text(
        "task: multilora_choice\n" + data + "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: choices\ndoc_to_target: gold\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return str(folder)

def samples(out, task) -> list[dict]:
    return [json.loads(l) for l in next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()]

def test_lm_eval_local_completions(make_server, tmp_path):
    "lm-eval's own client scores adapter alpha: it says ' alpha' whatever the prompt, so both tasks come out at 1.0."
    url, _ = make_server("batched")
    out = tmp_path/"results"
    model_args = (f"model=alpha,base_url={url}/v1/completions,tokenizer={embedded_model_path()},"
                  "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1,timeout=120")
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args", model_args,
           "--tasks", "multilora_gen,multilora_choice", "--include_path", write_tasks(tmp_path/"tasks"),
           "--limit", "5", "--batch_size", "8", "--output_path", str(out), "--log_samples"]   # lists of prompts
    run = subprocess.run(cmd, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    assert results["results"]["multilora_gen"]["exact_match,none"] == 1.0
    assert results["results"]["multilora_choice"]["acc,none"] == 1.0
    assert [results["n-samples"][t]["effective"] for t in ("multilora_gen", "multilora_choice")] == [5, 5]
    gen = samples(out, "multilora_gen")
    assert len(gen) == 5 and all(s["filtered_resps"] == [" alpha alpha alpha"] for s in gen)
    for s in samples(out, "multilora_choice"):            # the loglikelihoods themselves: ~0 for alpha, ~-1e4 for beta
        ll = {c: float(r[0]) for c, r in zip(s["doc"]["choices"], s["filtered_resps"])}   # stored as strings
        assert -1e-3 < ll["alpha"] <= 0 and ll["beta"] < -100, s["filtered_resps"]

CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance"]

def test_schemathesis_finds_no_server_error_and_no_schema_violation(make_server, loaded, tmp_path):
    "A bounded schemathesis run against the live /openapi.json: no 5xx, and every response is the documented one."
    (tmp_path/"no_adapters").mkdir()           # loads all fail (400), so the shared model keeps alpha and beta
    url, _ = make_server("batched", app_kw={"adapter_root": tmp_path/"no_adapters", "max_new_tokens": 8,
                                            "max_prompt_tokens": 256, "max_prompt_chars": 2000})   # short generations
    names = json.dumps(["alpha", "beta", loaded[2]])   # so most requests reach the model instead of a 404
    (tmp_path/"schemathesis.toml").write_text(
        f"[dictionaries.models]\nvalues = {names}\n\n[parameters]\n"
        + "".join(f'"{k}" = {{ dictionary = "models", probability = 0.9 }}\n'
                  for k in ("body.model", "body.task_name", "path.model_id")))
    cmd = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
           "--config-file", str(tmp_path/"schemathesis.toml"), "run", f"{url}/openapi.json",
           "--checks", ",".join(CHECKS),
           "--max-examples", "30", "--seed", "1", "--workers", "1", "--request-timeout", "60",
           "--report", "junit", "--report-dir", str(tmp_path/"report")]
    run = subprocess.run(cmd, env=offline_env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    suite = ElementTree.parse(next((tmp_path/"report").glob("junit-*.xml"))).getroot().find("testsuite")
    assert (suite.get("failures"), suite.get("errors")) == ("0", "0")
    tested = {c.get("name") for c in suite.iter("testcase")}
    paths = httpx.get(url + "/openapi.json").json()["paths"]
    assert tested >= {f"{m.upper()} {p}" for p, ops in paths.items() for m in ops}, tested    # every operation

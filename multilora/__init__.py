"Train many LoRA adapters on one 4-bit base model, and serve them all from that one model."
__version__ = "0.1.0"

# The names a user needs for the whole flow, task -> attach -> train -> evaluate -> merge -> serve, by the module that
# defines each. They are imported on first use, so `import multilora` (and the `multilora` command) stays quick.
_WHERE = {"model": ["load_base_model", "load_tokenizer", "generate"],
          "adapters": ["Task", "PromptTemplate", "task_preset", "register_task", "summarization_task", "sql_task",
                       "attach_adapters", "load_adapters", "save_adapters"],
          "data": ["builtin_tasks"], "builtin_data": ["load_builtin"],
          "train": ["TrainConfig", "MultiLoRATrainer", "run_from_config", "load_config", "demo_adapters"],
          "evaluate": ["evaluate_adapters", "EvalConfig", "format_results"], "merge": ["merge_adapter", "verify_merge"],
          "engine": ["GenRequest", "make_engine", "load_for_serving"], "server": ["create_app", "serve", "BackgroundServer"]}
_MODULE = {name: module for module, names in _WHERE.items() for name in names}
__all__ = list(_MODULE)

def __getattr__(name: str):
    if name not in _MODULE: raise AttributeError(f"module 'multilora' has no attribute {name!r}")
    import importlib
    value = globals()[name] = getattr(importlib.import_module(f"multilora.{_MODULE[name]}"), name)
    return value

def __dir__(): return sorted(list(globals()) + __all__)

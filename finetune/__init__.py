"""finetune: turn a folder of labelled images into a trained image classifier.

The library face (what the CLI itself calls):

    import finetune
    result = finetune.train(finetune.TrainConfig(data=Path("photos"), arch="efficientnet_lite0"))
    model = finetune.load_model(result.run_dir)          # a model file, a run folder, or None: the newest run
    for p in finetune.predict(model, ["new.jpg", "more/"]):
        print(p.path, p.label, p.score)
    report = finetune.evaluate(model, "photos")           # DATA/test, DATA/val or DATA's class folders
    finetune.export(model, "onnx", "model.onnx")

Everything the library refuses is a `FinetuneError` with a message naming the file and the
fix. Progress goes to an optional `Reporter`.
"""

__version__ = "0.1.0"

# Loaded on first use, so that `import finetune` (and the CLI's --help) does not wait for torch.
_LAZY = {
    "train": ("training", "train"),
    "load_model": ("checkpoint", "load_model"),
    "predict": ("prediction", "predict"),
    "evaluate": ("evaluation", "evaluate"),
    "export": ("exporting", "export"),
    "TrainConfig": ("config", "TrainConfig"),
    "PredictConfig": ("config", "PredictConfig"),
    "FinetuneError": ("errors", "FinetuneError"),
    "Reporter": ("progress", "Reporter"),
    "TrainResult": ("records", "TrainResult"),
    "EpochRecord": ("records", "EpochRecord"),
    "EvaluationReport": ("records", "EvaluationReport"),
    "Prediction": ("prediction", "Prediction"),
    "LoadedModel": ("checkpoint", "LoadedModel"),
    "ExportResult": ("exporting", "ExportResult"),
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'finetune' has no attribute '{name}'")
    import importlib

    module, attr = _LAZY[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``import drift; drift.measure(model_a, model_b, images, labels)``: the submodule, imported on first use
    # (it is callable, drift.measure.measure).
    if name == "measure":
        import importlib

        return importlib.import_module(".measure", __name__)
    raise AttributeError(f"module 'drift' has no attribute {name!r}")

"""aae-dist: distributed training of Adversarial Autoencoders on Ray Train.

    import aae_dist
    result = aae_dist.train({"data": {"path": "runs-data/mnist"}}, overrides={"train.epochs": 3}, workers=0)
    model = aae_dist.load(result.run_dir)      # an nn.Module: encode, reconstruct, decode, sample

The names below are loaded on first use, so `aae-dist --help` does not pay for torch."""

__version__ = "0.1.0"

__all__ = ["AAEModel", "Config", "Result", "UserError", "__version__", "load", "train"]

_WHERE = {"train": "api", "load": "api", "Result": "api", "AAEModel": "api", "Config": "config", "UserError": "errors"}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'aae_dist' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + [n for n in __all__ if n not in globals()])

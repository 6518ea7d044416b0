"""Trainer callbacks (stylegan2-ada's progress_fn/abort_fn manner): functions the trainer calls at fixed
points, given to `Trainer(..., callbacks=[...])` in-process, or named in `train.callbacks` as
"module:function" so Ray workers import them (the module must be importable where the workers run).

A callback is `fn(event, **info)`; it ignores events it does not know.  Events:
- "step": after every step, on every rank: world, rank, step.
- "checkpoint_written": rank 0, after a checkpoint's files are written and before they are reported
  to the session (a crash here leaves an unreported checkpoint): run_name, step, folder.
A callback that raises stops the run like any other error in the loop."""

from __future__ import annotations

import importlib
from typing import Callable, Iterable

from ..errors import UserError

Callback = Callable[..., None]


def resolve(spec: str) -> Callback:
    """ "pkg.module:function" -> the function."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise UserError(f"train.callbacks entry {spec!r}: expected 'module:function', e.g. 'mypkg.hooks:on_event'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"train.callbacks entry {spec!r} cannot be loaded ({type(e).__name__}: {e}): make the module importable "
                        "where the workers run (submit --py-modules, PYTHONPATH)") from None
    if not callable(fn):
        raise UserError(f"train.callbacks entry {spec!r} is not a function")
    return fn


def import_modules(names: Iterable[str]) -> None:
    """train.imports: modules imported before anything is built (they register loss terms and priors)."""
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UserError(f"train.imports: module {name!r} cannot be imported ({e}): make it importable where the "
                            "workers run (submit --py-modules, PYTHONPATH)") from None


class Callbacks:
    """The trainer's callbacks: the ones passed in, then the ones train.callbacks names."""

    def __init__(self, given: Iterable[Callback] = (), specs: Iterable[str] = ()):
        self.fns = list(given) + [resolve(s) for s in specs]

    def __bool__(self) -> bool:
        return bool(self.fns)

    def __call__(self, event: str, **info) -> None:
        for fn in self.fns:
            fn(event, **info)

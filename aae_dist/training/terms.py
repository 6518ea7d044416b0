"""Loss terms that describe themselves (stylegan2-ada's training_stats manner): a term is one function,
registered once with the phase it adds to, the config field holding its weight and the statistics it
reports.  The phase list composes the registered terms; the coordinator reduces whatever they report
and the reporter logs it, so adding a term touches nothing else.

A term function takes (ctx, batch, settings) and returns (value, {stat: tensor}); the phase adds
`weight x value` to its loss.  `batch` (`Batch`) shares what several terms read (the codes of x, the
consistency target) and computes each once, in the order the terms ask for it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UserError

TermFn = Callable[..., tuple[Any, dict]]


@dataclass(frozen=True)
class Settings:
    """What a term may read at build time: its phase's section, the model section, the variant's and the
    regularizer's rows.  Terms read them while the step runs; nothing reads the whole config."""

    phase: Any
    model: Any
    row: Any
    regularizer: Any
    phases: Any = None  # every phase's section (the generator reads the discriminators' input noise)


@dataclass(frozen=True)
class Term:
    name: str
    phase: str
    fn: TermFn
    weight: str | Callable[[Settings], float] | None  # a field of the phase section, a function of the settings, or None: always on, unweighted
    stats: tuple[str, ...]  # the statistics it reports (declared so every rank's reduction has them from step 0)
    when: Callable[[Settings], bool] | None = None  # e.g. only where the variant has what it needs

    def weight_in(self, s: Settings) -> float | None:
        """None: unweighted (always on); 0: off."""
        if self.weight is None:
            return None
        if callable(self.weight):
            return float(self.weight(s))
        if hasattr(s.phase, self.weight):
            return float(getattr(s.phase, self.weight))
        return float(getattr(s.phase, "terms", {}).get(self.weight, 0.0))

    def active(self, s: Settings) -> bool:
        if self.when is not None and not self.when(s):
            return False
        w = self.weight_in(s)
        return w is None or w != 0.0


TERMS: dict[str, list[Term]] = {}  # phase name -> its terms, in registration order (the order they add up in)


def term(phase: str, *, weight=None, stats: tuple[str, ...] = (), when=None, name: str | None = None):
    """Register a loss term of `phase`: `@term("reconstruction", weight="my_weight", stats=("my_stat",))`.
    weight: a field of phases.<phase>, or any name set under phases.<phase>.terms (0 by default: off)."""

    def register(fn: TermFn) -> TermFn:
        t = Term(name or fn.__name__, phase, fn, weight, tuple(stats), when)
        mine = TERMS.setdefault(phase, [])
        mine[:] = [old for old in mine if old.name != t.name] + [t]  # registering again (a reload) replaces it
        return fn

    return register


def terms_of(phase: str, s: Settings) -> list[tuple[Term, float | None]]:
    """The active terms of a phase with their weights, in registration order."""
    return [(t, t.weight_in(s)) for t in TERMS.get(phase, []) if t.active(s)]


def check_named_terms(phase: str, section) -> None:
    """phases.<phase>.terms may only name registered terms (a typo would silently train without it)."""
    known = {t.weight for t in TERMS.get(phase, []) if isinstance(t.weight, str)}
    for key in getattr(section, "terms", {}) or {}:
        if key not in known:
            raise UserError(f"phases.{phase}.terms.{key}: no loss term of phase '{phase}' is registered under that name "
                            f"(known: {', '.join(sorted(known)) or 'none'}); register it with aae_dist.training.terms.term "
                            "in a module named by train.imports")


class Batch:
    """One micro-batch as the terms of a phase see it: x, y and what several terms share, computed once."""

    def __init__(self, ctx, x, y):
        self.ctx, self.x, self.y = ctx, x, y
        self.shared: dict[str, Any] = {}

    def once(self, key: str, make: Callable[[], Any]):
        if key not in self.shared:
            self.shared[key] = make()
        return self.shared[key]

"""One early stopper per loss term, the stop rule, and the one notion of "best epoch"."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ._early_stopping import TOTAL_KEY, EarlyStopping, StopRule, stop_defaults

StopConfig = Mapping[str, "tuple[int, float] | None"]


def monitored_values(values: Mapping[str, float]) -> dict[str, float]:
    """The values stoppers see: validation means when present, training means otherwise."""
    if any(k.startswith("val_") for k in values):
        return {k.removeprefix("val_"): v for k, v in values.items() if k.startswith("val_")}
    return dict(values)


class StopperSet:
    """Create and step the stoppers of a loop, and decide which epoch is best.

    The best epoch is the last one at which the *monitor* improved by more than its
    ``delta`` (the stop rule's named term, or ``total_loss`` for ``all``/``any``), the
    same test its stopper applies; the display, the stop message and the restored weights
    all use it.
    """

    def __init__(self, config: StopConfig | None, rule: StopRule, *, enabled: bool = True,
                 trace_func: Callable[[str], Any] = print) -> None:
        self.config = dict(config or {})
        self.rule = rule
        self.enabled = enabled
        self.trace_func = trace_func
        self.stoppers: dict[str, EarlyStopping] = {}
        self.tracker: EarlyStopping | None = None

    @property
    def monitor(self) -> str:
        return self.rule.monitor or TOTAL_KEY

    def _make(self, term: str, patience: int | None = None) -> EarlyStopping:
        cfg = self.config.get(term)
        d = stop_defaults(term)
        p, delta = (d.patience, d.delta) if cfg is None else cfg
        return EarlyStopping(p if patience is None else patience, delta=delta, name=term,
                             trace_func=self.trace_func)

    def validate(self, terms: Iterable[str]) -> None:
        """Refuse configured names that are no terms of the model."""
        terms = set(terms) | {TOTAL_KEY}
        if self.enabled:
            self.rule.validate(terms)
        unknown = sorted(set(self.config) - terms)
        if unknown:
            msg = (f"early_stopping names {unknown}, which the model does not return; its "
                   f"terms are {sorted(terms)}.")
            raise KeyError(msg)

    def setup(self, terms: Iterable[str]) -> dict[str, EarlyStopping]:
        """One stopper per term (``val_`` prefix ignored) and ``total_loss``."""
        names = [t.removeprefix("val_") for t in terms]
        if TOTAL_KEY not in names:
            names.append(TOTAL_KEY)
        self.validate(names)
        self.stoppers = {}
        if self.enabled:
            for term in names:
                if term in self.config and self.config[term] is None:
                    continue
                self.stoppers[term] = self._make(term)
        self.tracker = self.stoppers.get(self.monitor)
        if self.tracker is None and self.monitor in names:
            self.tracker = self._make(self.monitor, patience=2**31 - 1)
        return self.stoppers

    def reset(self) -> None:
        self.stoppers, self.tracker = {}, None

    def step(self, values: Mapping[str, float], epoch: int) -> tuple[bool, bool, str | None]:
        """Step every stopper with an epoch's values.

        Returns ``(stop, best, reason)``: whether the rule says stop, whether this epoch is
        the new best, and the stop message.
        """
        if self.tracker is None:
            self.setup(values)
        monitored = monitored_values(values)
        for term, stopper in self.stoppers.items():
            if term in monitored:
                stopper.step(monitored[term], epoch)
        best = False
        if self.tracker is not None and self.monitor in monitored:
            if self.tracker is self.stoppers.get(self.monitor):
                best = self.tracker.best_epoch == epoch
            else:
                best = self.tracker.step(monitored[self.monitor], epoch)
        stop, culprits = self.rule.decide(self.stoppers)
        reason = None
        if stop:
            desc = "; ".join(
                f"{t} made no progress larger than {self.stoppers[t].delta:g} for "
                f"{self.stoppers[t].counter} epochs (best {self.stoppers[t].best_score:.5g} at "
                f"epoch {self.stoppers[t].best_epoch})" for t in culprits)
            reason = f"early stop after epoch {epoch} (rule {self.rule.rule!r}): {desc}"
        return stop, best, reason

    def best_values(self) -> dict[str, float]:
        return {k: s.best_score for k, s in self.stoppers.items() if math.isfinite(s.best_score)}

    @property
    def best_score(self) -> float:
        return math.inf if self.tracker is None else self.tracker.best_score

    def state_dict(self) -> dict[str, Any]:
        tracked = None
        if self.tracker is not None and self.tracker is not self.stoppers.get(self.monitor):
            tracked = self.tracker.state_dict()
        return {"stoppers": {k: s.state_dict() for k, s in self.stoppers.items()},
                "tracker": tracked, "set_up": self.tracker is not None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stoppers = {}
        for name, sd in state["stoppers"].items():
            stopper = EarlyStopping(trace_func=self.trace_func)
            stopper.load_state_dict(sd)
            self.stoppers[name] = stopper
        self.tracker = self.stoppers.get(self.monitor)
        if state.get("tracker") is not None:
            self.tracker = EarlyStopping(trace_func=self.trace_func)
            self.tracker.load_state_dict(state["tracker"])

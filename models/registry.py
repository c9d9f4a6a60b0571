"""Model names -> classes, imported lazily so a process imports (and numba compiles) only the models it runs."""

from __future__ import annotations

import importlib
from typing import Any

from models.base import Model
from stream_app.core.errors import ConfigError

MODELS: dict[str, str] = {
    "pop": "models.popularity:Popularity",
    "mf": "models.mf:MF",
    "gru": "models.gru:GRU4Rec",
    "markov": "models.markov:Markov",
    "sknn": "models.sknn:SessionKNN",
    "dnn": "models.dnn:DNN",
    "caser": "models.caser:Caser",
    "blend": "models.blend:Blend",
}


def create(name: str, **params: Any) -> Model:
    """A new model by registry name, configured by keyword arguments."""
    try:
        target = MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(MODELS)}") from None
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(**params)


def parse_names(spec: str) -> list[str]:
    """`"pop,mf"` -> ["pop", "mf"], checking every name."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise ConfigError(f"unknown model(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(MODELS)}")
    return names

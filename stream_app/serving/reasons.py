"""Why an item is recommended: the `reason` objects of the lookup API's answers."""

from __future__ import annotations

import numpy as np

from models.base import Model
from models.blend import Blend, Features
from stream_app.core.events import EVENT_TYPES, EVENT_WEIGHTS
from stream_app.serving.view import ShardView


def popular(context: dict[str, str]) -> dict:
    """Recommended because it is popular in this context (unknown users, sessions and items)."""
    return {"kind": "popular", "context": dict(context)}


def strongest(history: np.ndarray) -> dict[int, str]:
    """Item row -> its strongest event type in a user's history (purchase > favorite > click)."""
    out: dict[int, str] = {}
    for item, code in history.tolist():
        kind = EVENT_TYPES[code] if 0 <= code < len(EVENT_TYPES) else "click"
        if item not in out or EVENT_WEIGHTS[kind] > EVENT_WEIGHTS[out[item]]:
            out[item] = kind
    return out


def session_history(items: np.ndarray) -> np.ndarray:  # [n, 2]
    """A session's items (oldest first) as a history of clicks, for `similar_to_history`."""
    return np.stack([np.asarray(items, np.int64), np.full(len(items), EVENT_TYPES.index("click"))], axis=1)


def similar_to_history(view: ShardView, model: str, idx: np.ndarray, history: np.ndarray,
                       context: dict[str, str]) -> list[dict]:
    """For each recommended row in `idx`, the item of the user's recent history closest to it.

    Closeness is the cosine of similarity vectors (model `model` first, else any served model that
    has them), else co-occurrence in the shard's histories; ties go to the most recent item.
    """
    if len(idx) == 0:
        return []
    kinds = strongest(history)
    anchors = list(dict.fromkeys(int(i) for i in history[::-1, 0].tolist() if 0 <= i < view.n_items))
    anchors = [a for a in anchors if view.valid_items[a]]
    if not anchors:
        return [popular(context)] * len(idx)
    vm = view.vector_model(model)
    vectors = view.item_vectors(vm) if vm is not None else None
    if vectors is not None:
        sims = vectors[idx] @ vectors[anchors].T  # [k, anchors], tiny
        how = "embedding"
    else:
        sims = view.cooccurrence().counts(idx.tolist(), anchors)
        how = "co_occurrence"
    best = np.argmax(sims, axis=1)
    top = sims[np.arange(len(best)), best].tolist()
    out = []
    for j, sim in zip(best.tolist(), top):
        a = anchors[j]
        out.append({"kind": "similar_to", "item_id": view.item_names[a], "event_type": kinds.get(a, "click"),
                    "by": how, "similarity": sim})
    return out


def with_blend(model: Model, explained: tuple[np.ndarray, Features] | None, idx: np.ndarray,
               reasons: list[dict]) -> list[dict]:
    """For a blend, each reason with the members that made the score: each one's weights (on its
    standardised score and on its reciprocal rank) and its part of the item's score, largest first.
    `explained`: the weights and features of the query (`Blend.explain`)."""
    if not isinstance(model, Blend) or explained is None or len(idx) == 0:
        return reasons
    weights, z = explained  # [F], the query's features
    parts = model.contributions(weights, z, idx)  # [k, M]
    m = len(model.members)
    dense, ranked = weights[:m].tolist(), (weights[m:] if len(weights) > m else np.zeros(m)).tolist()
    order = np.argsort(-parts, axis=1, kind="stable").tolist()  # largest part first, ties in members' order
    out = []
    for reason, row, best in zip(reasons, parts.tolist(), order):
        members = [{"model": model.members[f], "weight": dense[f], "rank_weight": ranked[f], "part": row[f]}
                   for f in best]
        out.append({**reason, "blend": members})
    return out

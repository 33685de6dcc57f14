"""Cross-references in a policy file: names one part uses that another part must define.

They are checked on the raw data, so they are reported alongside schema errors instead of after them.
"""

from __future__ import annotations

from typing import Any

from gateway.config.issues import Loc


def section_items(data: dict[str, Any], key: str) -> list[tuple[int, dict[str, Any]]]:
    """The mappings of a list section, with their index (other shapes are schema errors)."""
    section = data.get(key)
    if not isinstance(section, list):
        return []
    return [(i, item) for i, item in enumerate(section) if isinstance(item, dict)]


def _names(data: dict[str, Any], key: str) -> list[tuple[int, str]]:
    return [
        (i, item["name"])
        for i, item in section_items(data, key)
        if isinstance(item.get("name"), str)
    ]


def _duplicates(data: dict[str, Any], key: str, what: str) -> list[tuple[Loc, str]]:
    seen: dict[str, int] = {}
    out: list[tuple[Loc, str]] = []
    for i, name in _names(data, key):
        if name in seen:
            out.append(((key, i, "name"), f"{what} {name!r} is defined twice ({key}.{seen[name]})"))
        else:
            seen[name] = i
    return out


def reference_problems(data: dict[str, Any]) -> list[tuple[Loc, str]]:
    """Duplicate names, and names used but not defined (backends, models, SLO classes)."""
    out = _duplicates(data, "backends", "backend")
    out += _duplicates(data, "models", "model")
    out += _duplicates(data, "tenants", "tenant")
    backends = {
        name: item
        for i, item in section_items(data, "backends")
        if isinstance(name := item.get("name"), str)
    }
    known_backends = ", ".join(sorted(backends)) or "none"
    models = {name for _, name in _names(data, "models")}
    for i, m in section_items(data, "models"):
        listed = m.get("backends")
        for j, b in enumerate(listed if isinstance(listed, list) else []):
            if not isinstance(b, str):
                continue
            if b not in backends:
                out.append(
                    (
                        ("models", i, "backends", j),
                        f"unknown backend {b!r} (backends: {known_backends})",
                    )
                )
                continue
            mapped = backends[b].get("models")
            name = m.get("name")
            if isinstance(mapped, dict) and isinstance(name, str) and name not in mapped:
                out.append(
                    (
                        ("models", i, "backends", j),
                        f"backend {b!r} has no mapping for model {name!r} (its models: {', '.join(sorted(map(str, mapped)))})",
                    )
                )
    out += _embedding_problems(data, backends)
    slo = data.get("slo_classes")
    classes = set(slo) if isinstance(slo, dict) else {"interactive", "batch"}
    known_models = ", ".join(sorted(models)) or "none"
    for i, t in section_items(data, "tenants"):
        cls = t.get("slo_class")
        if isinstance(cls, str) and cls not in classes:
            out.append(
                (
                    ("tenants", i, "slo_class"),
                    f"unknown slo_class {cls!r} (known: {', '.join(sorted(classes))})",
                )
            )
        allowed = t.get("allowed_models")
        for j, name in enumerate(allowed if isinstance(allowed, list) else []):
            if isinstance(name, str) and name not in models:
                out.append(
                    (
                        ("tenants", i, "allowed_models", j),
                        f"unknown model {name!r} (models: {known_models})",
                    )
                )
    feed = data.get("price_feed")
    feed_map = feed.get("map") if isinstance(feed, dict) else None
    for feed_id, target in feed_map.items() if isinstance(feed_map, dict) else []:
        backend = str(target).partition("/")[0]
        if backend not in backends:
            out.append(
                (
                    ("price_feed", "map", str(feed_id)),
                    f"unknown backend {backend!r} (backends: {known_backends})",
                )
            )
    return out


def _embedding_problems(
    data: dict[str, Any], backends: dict[str, dict[str, Any]]
) -> list[tuple[Loc, str]]:
    """One public model name must be one embedding model: vectors of two are not comparable."""
    out: list[tuple[Loc, str]] = []
    for i, m in section_items(data, "models"):
        name, listed = m.get("name"), m.get("backends")
        if not isinstance(name, str) or not isinstance(listed, list):
            continue
        declared: dict[str, Any] = {}
        for b in listed:
            emb = backends.get(b, {}).get("embeddings") if isinstance(b, str) else None
            if isinstance(emb, dict) and name in emb:
                declared[b] = emb[name]
        if len({str(v) for v in declared.values()}) > 1:
            spaces = ", ".join(f"{b} serves {e}" for b, e in declared.items())
            out.append(
                (
                    ("models", i, "backends"),
                    f"model {name!r} mixes embedding models ({spaces}): their vectors are "
                    "not comparable, so one model name must be one embedding model; "
                    "split it into one model per embedding model",
                )
            )
    return out

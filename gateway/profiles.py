"""Reading GPU performance profiles: a shipped name (policies/profiles/NAME.yaml) or a file path."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from policies.profile import parse_profile
from policies.spec import ThroughputProfileSpec

_SUFFIX = ".yaml"


def shipped_profiles() -> list[str]:
    """Names of the profiles that ship with neogate."""
    folder = resources.files("policies").joinpath("profiles")
    return sorted(
        p.name.removesuffix(_SUFFIX) for p in folder.iterdir() if p.name.endswith(_SUFFIX)
    )


def load_profile(ref: str, base_dir: Path | None = None) -> ThroughputProfileSpec:
    """The profile `ref` names: a shipped profile, else a YAML file (relative to `base_dir`).

    Raises ValueError saying what is wrong (unknown name, unreadable or invalid file).
    """
    names = shipped_profiles()
    if ref in names:
        text = resources.files("policies").joinpath("profiles", ref + _SUFFIX).read_text("utf-8")
        where = f"shipped profile {ref}"
    else:
        path = Path(ref).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(
                f"profile {ref!r} is neither a shipped profile ({', '.join(names)}) "
                f"nor a readable file: {exc.strerror or exc}"
            ) from exc
        where = f"profile file {path}"
    try:
        return parse_profile(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"{where}: {problems}") from exc
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc

"""The Python environment a stage runs in: is it the project's, and which library versions does it hold.

Standard library only, so it can run before anything else is imported:

    require_project_environment()   # in stages/__init__.py: one clear line instead of a raw ImportError
    library_versions()              # {"torch": "2.13.0+cpu", "trl": "1.16.0", ...}
    unlocked_versions()             # installed versions that differ from requirements.lock

Results depend on these libraries, so requirements.lock is a DVC dependency of every
stage, the training stages fingerprint their checkpoints with ``library_versions()``,
and models and metrics record them. DVC cannot see what is installed, only the lock:
a stage warns when the two disagree.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Optional

log = logging.getLogger("tunepipe.environment")

LOCK_FILE = Path(__file__).resolve().parent.parent / "requirements.lock"

# Libraries whose version can change a trained model or a metric.
RESULT_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "datasets", "tokenizers",
                    "safetensors", "rouge-score", "nltk", "scipy", "numpy", "lm-eval")

# Import names every stage needs (the import name, the distribution that provides it).
REQUIRED_MODULES = (("pydantic", "pydantic"), ("yaml", "pyyaml"), ("torch", "torch"),
                    ("transformers", "transformers"), ("datasets", "datasets"), ("sklearn", "scikit-learn"),
                    ("dvclive", "dvclive"))


def missing_modules() -> list[str]:
    """Distributions of REQUIRED_MODULES that this Python cannot import."""
    return [dist for module, dist in REQUIRED_MODULES if importlib.util.find_spec(module) is None]


def require_project_environment() -> None:
    """Exit with one line saying how to fix it when this Python lacks the project's packages.

    Typical cause: ``dvc repro`` run from a venv's dvc without activating the venv, so
    dvc.yaml's ``python -m stages.X`` finds the system Python.
    """
    missing = missing_modules()
    if not missing:
        return
    venv = LOCK_FILE.parent / ".venv" / "bin" / "activate"
    fix = (f"source {venv.relative_to(Path.cwd()) if venv.is_relative_to(Path.cwd()) else venv}"
           if venv.exists() else "make setup, then source .venv/bin/activate")
    print(f"error: {sys.executable} lacks the project's packages ({', '.join(missing)}); "
          f"run the stages with the project's environment: {fix}", file=sys.stderr)
    sys.exit(2)


def installed_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, Optional[str]]:
    """Installed versions of RESULT_LIBRARIES (None: not installed) and of Python."""
    versions = {dist: installed_version(dist) for dist in RESULT_LIBRARIES}
    versions["python"] = ".".join(map(str, sys.version_info[:3]))
    return versions


def locked_versions(lock_file: Path = LOCK_FILE) -> dict[str, str]:
    """``name==version`` pins of requirements.lock, names normalised as pip does."""
    if not lock_file.is_file():
        return {}
    pins = {}
    for line in lock_file.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_normal(name)] = version.strip()
    return pins


def unlocked_versions(lock_file: Path = LOCK_FILE) -> dict[str, tuple[Optional[str], str]]:
    """RESULT_LIBRARIES whose installed version differs from the lock: {name: (installed, locked)}.

    Local build tags are ignored (torch 2.13.0+cu128 on a GPU matches a lock's 2.13.0+cpu):
    the same release computes the same thing on either build.
    """
    pins = locked_versions(lock_file)
    out = {}
    for dist in RESULT_LIBRARIES:
        locked = pins.get(_normal(dist))
        installed = installed_version(dist)
        if locked and _public(installed) != _public(locked):
            out[dist] = (installed, locked)
    return out


def warn_if_unlocked() -> None:
    for dist, (installed, locked) in unlocked_versions().items():
        log.warning("%s %s is installed but requirements.lock pins %s: results may differ from the lock's; "
                    "run `make setup` (or `make lock` to adopt the installed versions)", dist, installed, locked)


def _normal(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def _public(version: Optional[str]) -> Optional[str]:
    return version.split("+", 1)[0] if version else version

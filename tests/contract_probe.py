"""Run one stage exactly as dvc.yaml does and record what it reads: params keys and files.

    cd <project> && python <repo>/tests/contract_probe.py OUT.json -m stages.evaluate --model base

Used by tests/test_contract.py. The params object handed to the stage records every key
the stage touches (an attribute read, or a section dumped whole); an audit hook records
every file the stage's Python code opens for reading, and every module it imports.
Files opened by compiled code (safetensors, Rust tokenizers, Arrow) are not seen, but
each lives in a folder whose other files are (config.json, tokenizer_config.json,
state.json), so the folder still shows up as read.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
from pathlib import Path

ROOT = Path.cwd().resolve()
READS: set[str] = set()
KEYS: set[str] = set()


class Recorder:
    """A read-only view of a pydantic params section that notes each key read (dotted)."""

    def __init__(self, model, prefix: str = ""):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name):
        from pydantic import BaseModel

        model = object.__getattribute__(self, "_model")
        value = getattr(model, name)
        if name in type(model).model_fields:
            path = object.__getattribute__(self, "_prefix") + name
            if isinstance(value, BaseModel):
                return Recorder(value, path + ".")
            KEYS.add(path)
        return value

    def model_dump(self, *args, **kwargs):
        dumped = object.__getattribute__(self, "_model").model_dump(*args, **kwargs)
        KEYS.update(object.__getattribute__(self, "_prefix") + key for key in dumped)
        return dumped


def _relative(path) -> str | None:
    if isinstance(path, int):
        return None
    try:
        full = Path(os.fsdecode(path))
        full = (full if full.is_absolute() else Path.cwd() / full).resolve()
        rel = full.relative_to(ROOT)
    except (TypeError, ValueError, OSError):
        return None
    if not full.exists():
        # a name relative to a directory descriptor (shutil.rmtree opens entries with dir_fd),
        # or a file that is not there: nothing was read from the project at that path
        return None
    if rel.parent.name == "__pycache__":  # compiled module: count it as its source
        rel = rel.parent.parent / (rel.name.split(".")[0] + ".py")
    return rel.as_posix()


def _hashing_code() -> bool:
    """True inside the training fingerprint's hash of all the code (it reads it, it does not run it)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "code_sha256":
            return True
        frame = frame.f_back
    return False


def _audit(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR))
        rel = None if writing else _relative(path)
    elif event in ("os.listdir", "os.scandir"):
        rel = _relative(args[0] if args and args[0] is not None else ".")
    else:
        return
    if rel and rel != "." and not _hashing_code():
        READS.add(rel)


def main() -> None:
    out, argv = Path(sys.argv[1]).resolve(), sys.argv[2:]
    assert argv[0] == "-m", "usage: contract_probe.py OUT.json -m MODULE [ARGS...]"
    sys.path.insert(0, str(ROOT))
    from tunepipe import cli, params

    real_load = params.load_params
    cli.load_params = lambda path=None: Recorder(real_load(path))
    sys.addaudithook(_audit)
    sys.argv = [argv[1], *argv[2:]]
    code = 0
    try:
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code or 0
    out.write_text(json.dumps({"exit": code, "params": sorted(KEYS), "reads": sorted(READS)}))


if __name__ == "__main__":
    main()

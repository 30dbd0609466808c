"""The command line every stage shares: ``--help``, ``--params``, and clean failures.

Params are validated before the stage imports torch or touches data, so a bad
key stops the run in about a second. Known failures (bad params, bad data)
print one clear message and exit 2 instead of a traceback.

    if __name__ == "__main__":
        run_stage(__doc__, main)      # main(params: Params) -> None
        run_stage(__doc__, main, options={"--model": {"required": True}})   # main(params, model=...)
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from typing import Callable

from tunepipe.artifacts import DataError
from tunepipe.environment import warn_if_unlocked
from tunepipe.params import ParamsError, load_params

log = logging.getLogger("tunepipe")

# Disk full, quota, read-only or unwritable output folder: the user's to fix, not a bug.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class StageError(RuntimeError):
    """A stage cannot go on; the message says why and what to change."""


def run_stage(doc: str, main: Callable[..., None], argv: list[str] | None = None,
              options: dict[str, dict] | None = None) -> None:
    """Parse the command line, validate params, run ``main(params, **options)``, fail cleanly.

    ``options``: extra command-line options of the stage, ``{"--model": argparse kwargs}``;
    their values reach ``main`` as keyword arguments (``model=...``).
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=os.environ.get("TUNEPIPE_PARAMS", "params.yaml"),
                        help="params file to read (default: params.yaml)")
    for flag, kwargs in (options or {}).items():
        parser.add_argument(flag, **kwargs)
    args = vars(parser.parse_args(argv))
    params_file = args.pop("params")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    # The default run is fully offline; a Hub source switches this off in sources.py.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        params = load_params(params_file)
        warn_if_unlocked()
        main(params, **args)
    except (ParamsError, DataError, StageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in WRITE_ERRORS:
            raise
        print(f"error: {exc.filename or 'output'}: {exc.strerror}; free space or fix permissions and rerun "
              "(outputs are replaced only when complete, so nothing was damaged)", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)

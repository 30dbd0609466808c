"""The command line every stage shares: ``--help``, ``--params``, and clean failures.

Params are validated before the stage imports torch or touches data, so a bad
key stops the run in about a second. Known failures (bad params, bad data)
print one clear message and exit 2 instead of a traceback.

    if __name__ == "__main__":
        run_stage(__doc__, main)      # main(params: Params) -> None
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from typing import Callable

from tunepipe.artifacts import DataError
from tunepipe.params import Params, ParamsError, load_params

log = logging.getLogger("tunepipe")

# Disk full, quota, read-only or unwritable output folder: the user's to fix, not a bug.
WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class StageError(RuntimeError):
    """A stage cannot go on; the message says why and what to change."""


def run_stage(doc: str, main: Callable[[Params], None], argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=os.environ.get("TUNEPIPE_PARAMS", "params.yaml"),
                        help="params file to read (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    # The default run is fully offline; a Hub source switches this off in sources.py.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        params = load_params(args.params)
        main(params)
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

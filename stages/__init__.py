"""Pipeline stages, one module each: run as `python -m stages.<name> --help`."""

from tunepipe.environment import require_project_environment

# Before any stage imports a library: a Python without the project's packages (dvc run
# from a venv that is not active) gets one line saying how to fix it, not an ImportError.
require_project_environment()

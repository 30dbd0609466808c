"""Pipeline stages, one module each: run as `python -m stages.<name> --help`."""

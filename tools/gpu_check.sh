#!/bin/sh
# The first-GPU check (docs/performance.md) with the project's python: .venv's where there is one.
d=$(dirname "$0"); py="$d/../.venv/bin/python"; [ -x "$py" ] || py=python3; exec "$py" "$d/gpu_check.py" "$@"

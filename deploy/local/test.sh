#!/usr/bin/env bash
# The tests: install with the dev extra, start the servers, then lint, type-check and test.
source "$(dirname "$0")/env.sh" dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/pytest "$@"

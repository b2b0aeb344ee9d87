#!/usr/bin/env bash
# The demo: install, start the servers, run the pipeline on a simulated fleet, print a summary.
source "$(dirname "$0")/env.sh" local
exec .venv/bin/usagepipe --log-level WARNING demo "$@"

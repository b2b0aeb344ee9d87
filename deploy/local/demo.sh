#!/usr/bin/env bash
# The demo: install, start the servers, run the pipeline on a simulated fleet (four weeks of
# usage of 1,200 appliances by default), print a summary and what a planner does next.
source "$(dirname "$0")/env.sh" local
exec .venv/bin/usagepipe --log-level WARNING demo "$@"

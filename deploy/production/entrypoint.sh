#!/bin/sh
# The usagepipe image's entry point: every Compose secret mounted as
# /run/secrets/USAGEPIPE_<SECTION>__<NAME> becomes that environment variable (its
# content, trailing newlines dropped), then the command runs. Settings are read from the
# environment only; the secrets never sit in compose.yaml or `docker inspect`.
set -eu
for file in /run/secrets/USAGEPIPE_*; do
  [ -f "$file" ] || continue
  export "$(basename "$file")=$(cat "$file")"
done
exec "$@"

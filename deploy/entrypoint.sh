#!/bin/sh
# Container entry point for vlmbridge (deploy/Dockerfile installs it as /usr/local/bin/vlmbridge-entrypoint).
#   serve [ARGS]   (default) check the model with `vlmbridge doctor`, then serve it on all interfaces (with
#                  VLMBRIDGE_MODELS_FILE: serve the models file's models); refuses to listen beyond loopback
#                  without an API key
#   healthcheck    exit 0 when GET /health answers 200 (the Dockerfile's HEALTHCHECK)
#   anything else  run as given, e.g. `docker run --rm IMAGE vlmbridge doctor /models`
# Settings come from VLMBRIDGE_* variables (see `vlmbridge serve --help`).
set -eu

cmd="${1:-serve}"
[ "$#" -gt 0 ] && shift

case "$cmd" in
  serve)
    export VLMBRIDGE_HOST="${VLMBRIDGE_HOST:-0.0.0.0}"
    export VLMBRIDGE_PORT="${VLMBRIDGE_PORT:-8000}"
    model="${VLMBRIDGE_MODEL:-/models}"
    case "$VLMBRIDGE_HOST" in
      127.*|localhost|::1) ;;
      *)
        if [ -z "${VLMBRIDGE_API_KEYS:-}" ] && [ "${VLMBRIDGE_ALLOW_NO_API_KEY:-0}" != "1" ]; then
          echo "vlmbridge: refusing to listen on $VLMBRIDGE_HOST without an API key: set VLMBRIDGE_API_KEYS" \
            "(e.g. in deploy/.env), or VLMBRIDGE_ALLOW_NO_API_KEY=1 on a network you trust" >&2
          exit 2
        fi
        ;;
    esac
    if [ -n "${VLMBRIDGE_MODELS_FILE:-}" ]; then
      # Several models: the server runs the doctor on each before loading it; a broken one is reported `failed`
      # (GET /health, /admin/models) while the others serve.
      unset VLMBRIDGE_MODEL
      exec vlmbridge serve "$@"
    fi
    # The full doctor report goes to the container log; it explains host-vs-container path mistakes
    # (e.g. VLMBRIDGE_MODEL=/home/me/models/... instead of the mount point /models).
    rc=0
    vlmbridge doctor "$model" || rc=$?
    if [ "$rc" -ne 0 ]; then
      case "${VLMBRIDGE_SKIP_DOCTOR:-false}" in
        1|true|True|TRUE|yes) echo "vlmbridge: VLMBRIDGE_SKIP_DOCTOR is set: starting despite the doctor's errors" >&2 ;;
        *) echo "vlmbridge: the doctor found errors in $model (see above); not starting" >&2; exit "$rc" ;;
      esac
    fi
    exec vlmbridge serve "$model" "$@"
    ;;
  healthcheck)
    exec python3 -c 'import os, sys, urllib.request
url = "http://127.0.0.1:%s/health" % os.environ.get("VLMBRIDGE_PORT", "8000")
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through a proxy
try:
    sys.exit(0 if opener.open(url, timeout=4).status == 200 else 1)
except Exception as exc:
    print("unhealthy: %s" % exc, file=sys.stderr)
    sys.exit(1)'
    ;;
  *)
    exec "$cmd" "$@"
    ;;
esac

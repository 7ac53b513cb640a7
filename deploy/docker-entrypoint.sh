#!/bin/sh
# The image's entry point: the first argument is the role, the rest are sdserve's flags.
#   serve [flags]     web UI, every API and the engine in one process (the default)
#   serve             with SAGEMAKER_BIND_TO_PORT set and no flags: SageMaker mode (`docker run IMAGE serve`)
#   api [flags]       an API replica: no engine; needs SDSERVE_QUEUE=redis://...
#   worker [flags]    a GPU worker: probes and metrics on SDSERVE_METRICS_PORT
#   generate ...      one-off images to files (sdserve generate --help)
#   healthcheck       the image's HEALTHCHECK: 0 when this container's server answers /healthz
# Anything else runs as an sdserve command (e.g. `models`, `--help`).
set -eu

role="${1:-serve}"
[ "$#" -gt 0 ] && shift

case "$role" in
  serve)
    if [ "$#" -eq 0 ] && [ -n "${SAGEMAKER_BIND_TO_PORT:-}" ]; then
      exec sdserve serve --sagemaker
    fi
    exec sdserve serve "$@"
    ;;
  healthcheck)
    # The server's port, whichever role runs: SageMaker's, the HTTP port, or a worker's probe port.
    exec python3 - <<'PY'
import os, sys, urllib.request
ports = [os.environ.get("SAGEMAKER_BIND_TO_PORT"), os.environ.get("SDSERVE_PORT", "7860"),
         os.environ.get("SDSERVE_METRICS_PORT", "9200")]
for port in filter(None, ports):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:
            if response.status == 200:
                sys.exit(0)
    except OSError:
        pass
sys.exit(1)
PY
    ;;
  *)
    exec sdserve "$role" "$@"
    ;;
esac

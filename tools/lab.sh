#!/usr/bin/env bash
# Build the namespace lab (a probe source, a hypervisor with a pif, a bridge
# and one tap per guest, and two guests, one of them behind a 2 ms injected
# delay), measure it, print the report and remove the lab.  Extra arguments
# go to `netweaver lab` (see `netweaver lab --help`).  With --pipeline it
# also installs and runs the telemetry pipeline (RabbitMQ, Gnocchi, Aodh,
# Prometheus: tools/pipeline-bootstrap.sh) and prints what each one sees.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
for arg in "$@"; do
    if [ "$arg" = --pipeline ]; then
        bash tools/pipeline-bootstrap.sh
        break
    fi
done
exec .venv/bin/netweaver lab "$@"

#!/usr/bin/env bash
# Run the whole test suite (unit and functional) on this machine, as root.
# Functional tests build network namespaces, run ceilometer-polling, sshd
# and tcpdump inside them, and remove everything they made.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/bootstrap.sh
# RabbitMQ, PostgreSQL, Prometheus, the Gnocchi and Aodh venvs: the pipeline
# tests (tests/functional/test_pipeline.py, test_dashboard.py) run them.
bash tools/pipeline-bootstrap.sh
# bootstrap built the C loops (the capture reader's, the sender's, the probe
# builder's): their tests must run, not skip (tests/unit/test_pcapwalk.py,
# test_sendloop.py, test_probebuild.py).
export NETWEAVER_REQUIRE_PCAPWALK=1
exec .venv/bin/python -m pytest "$@"

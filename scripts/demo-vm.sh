#!/usr/bin/env bash
# make demo-vm: two QEMU VMs (real kernel, GRUB, A/B partitions) moved from the sample OS
# 1.0.0 to 2.0.0 by a real reboot, then shown. Needs root and the packages .ci/run installs.
set -euo pipefail
cd "$(dirname "$0")/.."
R=.venv/bin/rollout
WD=${WORKDIR:-/tmp/rollout-demo-vm}
MODE=${MODE:-reboot}
trap '$R fleet down --workdir "$WD" >/dev/null 2>&1 || true' EXIT
$R image sample-os "$WD/v2.img" --version 2.0.0
$R fleet up --vm --workdir "$WD"
cat > "$WD/policy.yaml" <<POLICY
activation: $MODE
batches: {canary: 1, size: "100%", max_unavailable: 1}
health:
  checks: [{type: http, port: 8080, path: /}, {type: agent}]
  interval: 1s
  min_healthy_time: 5s
  deadline: 3m
  boot_timeout: 5m
failure: {max_failed: 0, action: rollback}
POLICY
$R run --inventory "$WD/inventory.yaml" --policy "$WD/policy.yaml" --image "$WD/v2.img" \
  --state "$WD/state.db"
$R status --inventory "$WD/inventory.yaml"

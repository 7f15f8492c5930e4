#!/usr/bin/env bash
# One-time setup of a Prefect server for carflow's deployments (idempotent):
#   - process work pools `cpu` (crawl, ingest, clean, dataset, the nightly) and `gpu` (model stages);
#   - the global concurrency limit `gpu` that every inference/training step holds a slot of
#     (CARFLOW_GPU_SLOTS slots, default 1: one model stage at a time per GPU).
# Uses PREFECT_API_URL like every prefect command.
set -euo pipefail
PREFECT=${PREFECT:-prefect}
for pool in cpu gpu; do
  $PREFECT work-pool inspect "$pool" >/dev/null 2>&1 || $PREFECT work-pool create "$pool" --type process
done
$PREFECT global-concurrency-limit inspect gpu >/dev/null 2>&1 \
  || $PREFECT global-concurrency-limit create gpu --limit "${CARFLOW_GPU_SLOTS:-1}"
echo "prefect ready: work pools cpu, gpu; concurrency limit gpu"

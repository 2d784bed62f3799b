"""Gates: what a rollout waits for between batches, and the conditions before a batch starts.

After-batch gates (``after: canary | <batch number> | every``) run once the batch they
name has finished and the failure policy said "continue":

- ``bake``: wait a duration while the updated nodes keep being health-checked;
- ``wait``: a Heat-compatible wait condition, passed by ``count`` SUCCESS signals;
- ``approval``: a human says go (or no);
- ``analysis``: Prometheus measurements judged with Argo Rollouts semantics.

Before-batch conditions (``before: every | after-canary``) must hold when a batch starts:

- ``alerts``: no matching Prometheus alert fires (as kured does);
- ``window``: the wall clock is inside a maintenance window.

Modules, pure first:

- `expr`      the condition language of analysis gates (``result < 0.01 and not isNaN(result)``)
- `window`    maintenance-window arithmetic on aware datetimes (DST-correct)
- `analysis`  `assess` (pure verdict over measurements) and the measuring loop
- `alerts`    firing-alert filtering and `wait_clear`
- `signals`   wait-condition signal parsing, `SignalBox`, `ApprovalBox`, `GateBoxes`
- `handles`   the wait gates' pre-signed signal URLs: secrets derived from the signal key
- `prometheus` the small HTTP client the analysis and alerts gates use
- `events`    frozen event values every gate emits (journal, metrics, display)
- `schedule`  which gates apply after / before which batch
- `runner`    `run_gate`, `wait_before_batch`, the `GateContext` protocol and `GateEnv`
- `notify`    webhook notifier (background POSTs, retried, never blocking)
- `junit`     JUnit XML report writer for CI gating

This package file imports nothing, so rollout.policy can import `expr` and `window` to
validate a policy without an import cycle.
"""

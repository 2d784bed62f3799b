"""The CLI's exit codes, a contract (docs/cli.md): 0 done, 1 the rollout did not succeed
(or the controller could not be reached), 2 bad input."""

EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2

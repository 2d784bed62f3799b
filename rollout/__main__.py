"""`python -m rollout ...`: the same command line as the `rollout` script."""

from rollout.cli import main

main()

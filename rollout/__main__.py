"""`python -m rollout ...`: the same command line as the `rollout` script."""

from rollout.cli import main

if __name__ == "__main__":
    main()

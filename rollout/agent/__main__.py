"""`python -m rollout.agent ...`: the agent command without the top-level CLI."""

from rollout.agent.cli import agent

if __name__ == "__main__":
    agent(prog_name="rollout agent")

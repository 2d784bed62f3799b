"""rollout: batched, health-checked A/B image upgrades over a fleet of node agents."""

__version__ = "0.1.0"

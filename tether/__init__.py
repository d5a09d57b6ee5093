"""tether: identity connector appliances (agent, home, image tooling)."""

__version__ = "0.1.0"

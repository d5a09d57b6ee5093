"""The appliance agent: self-check, identity, dial home, serve directory operations."""

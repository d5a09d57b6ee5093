"""tether-home: the reference control plane that agents dial into."""

"""Who may call the gateway and what one request may hold: tenants, credentials, rates, limits."""

"""Examples of agent modules a deployment can serve with `AGENTOS_AGENTS`."""

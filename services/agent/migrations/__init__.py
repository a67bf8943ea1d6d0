"""Schema migrations of the agent's database, oldest first (see services/common/migrations)."""

"""Schema migrations of the gateway's database, oldest first (see services/common/migrations)."""

"""Schema migrations of the retrieval's database, oldest first (see services/common/migrations)."""

"""Schema migrations of the finetune's database, oldest first (see services/common/migrations)."""

"""The gateway schema: its declarative base and the projects table (keys.py and audit.py declare
the others; importing keys.py registers them all)."""

from datetime import datetime

from sqlalchemy import BigInteger, DateTime, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class ProjectRow(Base):
    """A project: what a key belongs to, and what every object the services keep for it is
    scoped by (its id travels to them as `X-Crucible-Owner`)."""

    __tablename__ = "projects"

    # `proj_...`; a project migrated from an owner of the keys before projects keeps that name.
    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    archived_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Tokens, and micro-dollars, per UTC day or month for all its keys together (budgets.py);
    # None: no budget of that unit.
    budget_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    budget_usd_micros: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    budget_period: Mapped[str] = mapped_column(String(8), default="month", server_default="month")

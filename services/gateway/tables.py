"""The gateway schema's declarative base (keys.py and audit.py declare its tables; importing
keys.py registers both)."""

from sqlalchemy.orm import DeclarativeBase


class Base(DeclarativeBase):
    pass

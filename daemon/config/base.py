"""What every config model shares."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["SECRET", "Model"]

SECRET = "a secret: never logged; use ${ENV} or ${file:...}"


class Model(BaseModel):
    """Frozen, and an unknown key is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")

"""Chemistry tools on RDKit (`molecule_info`, `similarity`, `substructure_match`), run in the
tool sandbox (`sandbox.ToolSandbox`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from services.agent.tools.base import ToolContext
from services.agent.tools.sandbox import ToolSandbox

# Long enough for real molecules and for hostile ones to reach the sandbox's own checks.
Smiles = Annotated[str, Field(min_length=1, max_length=20_000, description="a SMILES string")]


class MoleculeArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    smiles: Smiles


class SimilarityArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    smiles_a: Smiles
    smiles_b: Smiles


class SubstructureArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    smiles: Smiles
    pattern: Annotated[str, Field(min_length=1, max_length=2_000, description="SMARTS")]


def _sandbox(ctx: ToolContext) -> ToolSandbox:
    sandbox: ToolSandbox = ctx.services.sandbox
    return sandbox


async def molecule_info(args: MoleculeArgs, ctx: ToolContext) -> dict[str, Any]:
    return await _sandbox(ctx).call("molecule_info", args.model_dump(), ctx.deadline)


async def similarity(args: SimilarityArgs, ctx: ToolContext) -> dict[str, Any]:
    return await _sandbox(ctx).call("similarity", args.model_dump(), ctx.deadline)


async def substructure_match(args: SubstructureArgs, ctx: ToolContext) -> dict[str, Any]:
    return await _sandbox(ctx).call("substructure_match", args.model_dump(), ctx.deadline)

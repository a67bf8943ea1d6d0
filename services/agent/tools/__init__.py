"""The agent's tools, one module per family. Nothing here runs code, opens a shell or fetches a
URL: documents come from the retrieval service, chemistry from a sandboxed RDKit process,
arithmetic from a parser."""

from __future__ import annotations

from services.agent.tools.base import Tool, ToolContext, ToolError
from services.agent.tools.calculator import CalculatorArgs, calculator
from services.agent.tools.chemistry import (
    MoleculeArgs,
    SimilarityArgs,
    SubstructureArgs,
    molecule_info,
    similarity,
    substructure_match,
)
from services.agent.tools.documents import SearchArgs, search_documents

TOOLS: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool(
            "search_documents",
            "Search the run's document stores. Returns passages, each with a source id (S1, ...)"
            " to cite.",
            SearchArgs,
            search_documents,
        ),
        Tool(
            "molecule_info",
            "Properties of a molecule given as SMILES: canonical SMILES, formula, molecular"
            " weight, logP, TPSA, H-bond donors and acceptors, rotatable bonds, Lipinski's rule"
            " of five.",
            MoleculeArgs,
            molecule_info,
        ),
        Tool(
            "similarity",
            "Tanimoto similarity of two molecules (SMILES) on Morgan fingerprints (radius 2).",
            SimilarityArgs,
            similarity,
        ),
        Tool(
            "substructure_match",
            "Whether a molecule (SMILES) contains a substructure (SMARTS pattern), and where.",
            SubstructureArgs,
            substructure_match,
        ),
        Tool(
            "calculator",
            "Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses, sqrt,"
            " log, log10, log2, exp, sin, cos, tan, abs, round, min, max, pi, e.",
            CalculatorArgs,
            calculator,
        ),
    )
}

__all__ = ["TOOLS", "Tool", "ToolContext", "ToolError"]

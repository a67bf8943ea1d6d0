"""The tool sandbox's worker process (`sandbox.ToolSandbox`): RDKit's chemistry and the calculator.

RDKit can spin for hours or allocate without bound on adversarial input, and crash on very large
molecules, so it never runs in the service's process: this worker reads one JSON request per line
on stdin and writes one JSON answer per line on stdout, under an address-space cap; the service
kills it at the call's timeout and starts another.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from rdkit import Chem, DataStructs, RDLogger
from rdkit.Chem import Crippen, Descriptors, Lipinski, rdFingerprintGenerator, rdMolDescriptors

from services.agent.tools.base import ToolError
from services.agent.tools.calculator import calculate
from services.common.rlimits import cap_memory

RDLogger.DisableLog("rdApp.*")  # the answers carry the errors; stderr is not read


class ChemError(Exception):
    pass


def parse(smiles: str, max_atoms: int) -> Chem.Mol:
    mol = Chem.MolFromSmiles(smiles, sanitize=False)
    if mol is None:
        raise ChemError(f"invalid SMILES {smiles[:60]!r}: not parseable")
    if mol.GetNumAtoms() > max_atoms:
        raise ChemError(f"molecule too large: {mol.GetNumAtoms()} atoms (limit {max_atoms})")
    try:
        Chem.SanitizeMol(mol)
    except Exception as exc:  # RDKit raises several sanitization exception types
        raise ChemError(f"invalid SMILES {smiles[:60]!r}: {exc}") from None
    return mol


def molecule_info(smiles: str, max_atoms: int) -> dict[str, Any]:
    mol = parse(smiles, max_atoms)
    mw = Descriptors.MolWt(mol)
    logp = Crippen.MolLogP(mol)
    hbd = Lipinski.NumHDonors(mol)
    hba = Lipinski.NumHAcceptors(mol)
    violations = [
        rule
        for rule, broken in (
            ("molecular weight > 500", mw > 500),
            ("logP > 5", logp > 5),
            ("H-bond donors > 5", hbd > 5),
            ("H-bond acceptors > 10", hba > 10),
        )
        if broken
    ]
    return {
        "canonical_smiles": Chem.MolToSmiles(mol),
        "formula": rdMolDescriptors.CalcMolFormula(mol),
        "molecular_weight": round(mw, 3),
        "logp": round(logp, 3),
        "tpsa": round(rdMolDescriptors.CalcTPSA(mol), 3),
        "h_bond_donors": hbd,
        "h_bond_acceptors": hba,
        "rotatable_bonds": Lipinski.NumRotatableBonds(mol),
        "heavy_atoms": mol.GetNumHeavyAtoms(),
        # Lipinski's rule of five: at most one violation.
        "lipinski": {"passes": len(violations) <= 1, "violations": violations},
    }


_MORGAN = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)


def similarity(smiles_a: str, smiles_b: str, max_atoms: int) -> dict[str, Any]:
    a, b = parse(smiles_a, max_atoms), parse(smiles_b, max_atoms)
    score = DataStructs.TanimotoSimilarity(_MORGAN.GetFingerprint(a), _MORGAN.GetFingerprint(b))
    return {
        "tanimoto": round(score, 4),
        "fingerprint": "Morgan radius 2, 2048 bits",
        "canonical_smiles": [Chem.MolToSmiles(a), Chem.MolToSmiles(b)],
    }


def substructure_match(smiles: str, pattern: str, max_atoms: int) -> dict[str, Any]:
    mol = parse(smiles, max_atoms)
    query = Chem.MolFromSmarts(pattern)
    if query is None:
        raise ChemError(f"invalid SMARTS pattern {pattern[:60]!r}")
    if query.GetNumAtoms() > max_atoms:
        raise ChemError(f"pattern too large: {query.GetNumAtoms()} atoms (limit {max_atoms})")
    matches = mol.GetSubstructMatches(query, maxMatches=100)
    return {
        "match": bool(matches),
        "count": len(matches),
        "count_capped_at": 100,
        "atom_indices": [list(m) for m in matches[:10]],
    }


def calculator(expression: str, max_atoms: int) -> dict[str, Any]:
    try:
        return calculate(expression)
    except ToolError as exc:
        raise ChemError(str(exc)) from None


OPS: dict[str, Callable[..., dict[str, Any]]] = {
    "molecule_info": molecule_info,
    "similarity": similarity,
    "substructure_match": substructure_match,
    "calculator": calculator,
}


def answer(request: dict[str, Any], max_atoms: int) -> dict[str, Any]:
    try:
        fn = OPS[request["op"]]
        return {"ok": True, "result": fn(**request["args"], max_atoms=max_atoms)}
    except ChemError as exc:
        return {"ok": False, "error": str(exc)}
    except MemoryError:
        return {"ok": False, "error": "out of memory (the chemistry sandbox's cap)"}
    except Exception as exc:  # anything RDKit throws is the input's problem, said to the model
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


def main() -> None:
    max_atoms, memory_mb = int(sys.argv[1]), int(sys.argv[2])
    cap_memory(memory_mb)
    out = sys.stdout
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
        except ValueError:
            reply: dict[str, Any] = {"ok": False, "error": "malformed request"}
        else:
            reply = answer(request, max_atoms)
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()

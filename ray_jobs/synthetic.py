"""Synthetic, learnable clinical entity-extraction data (no real patient data).

    python -m ray_jobs.synthetic --rows 2000 --seed 7 --out sample_data/synthetic/entities/notes.json
    python -m ray_jobs.synthetic --rows 24 --seed 99 --unseen-in sample_data/synthetic/entities/notes.json \
        --out sample_data/synthetic/entities/heldout.json

Sentences come from a few clinical templates filled with entities drawn from fixed lists,
so a tiny model can learn the mapping text -> JSON in minutes on a CPU while held-out
sentences (new combinations) still test generalisation. Used by the quickstart sample data
and by the "the pipeline learns" test.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DISEASES = [
    "diabetes",
    "asthma",
    "hypertension",
    "pneumonia",
    "migraine",
    "anemia",
    "gout",
    "sepsis",
    "bronchitis",
    "arthritis",
    "eczema",
    "angina",
]
MEDICATIONS = [
    "metformin",
    "aspirin",
    "insulin",
    "ibuprofen",
    "lisinopril",
    "albuterol",
    "warfarin",
    "amoxicillin",
    "prednisone",
    "atorvastatin",
    "heparin",
    "omeprazole",
]
DOSAGES = ["5mg", "10mg", "20mg", "40mg", "50mg", "100mg", "250mg", "500mg"]
FREQUENCIES = ["daily", "twice daily", "at night", "every morning", "weekly", "as needed"]
SYMPTOMS = ["fever", "cough", "fatigue", "nausea", "headache", "dizziness", "chest pain", "rash"]

TEMPLATES = [
    ("The patient has {Disease} and takes {Medication} {Dosage} {Frequency}.",),
    ("Patient reports {Symptom} and was diagnosed with {Disease}.",),
    ("Started {Medication} {Dosage} {Frequency} for {Disease}.",),
    ("History of {Disease}; presents with {Symptom}.",),
    ("Prescribed {Medication} {Dosage} for {Symptom}.",),
    ("Complains of {Symptom} after starting {Medication}.",),
]
POOLS = {
    "Disease": DISEASES,
    "Medication": MEDICATIONS,
    "Dosage": DOSAGES,
    "Frequency": FREQUENCIES,
    "Symptom": SYMPTOMS,
}


def entity_rows(count: int, seed: int = 0) -> list[dict]:
    """`count` rows in the entity-extraction seed's format: {text, entities[{label, text}]}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        template = rng.choice(TEMPLATES)[0]
        entities, filled = [], template
        for label in ("Disease", "Medication", "Dosage", "Frequency", "Symptom"):
            slot = "{" + label + "}"
            if slot in filled:
                value = rng.choice(POOLS[label])
                filled = filled.replace(slot, value, 1)
                entities.append((template.index(slot), {"label": label, "text": value}))
        entities.sort(key=lambda pair: pair[0])  # in reading order, as annotators list them
        rows.append({"text": filled, "entities": [entity for _, entity in entities]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", required=True)
    parser.add_argument("--unseen-in", help="only notes whose text is not in this file (a held-out set)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = entity_rows(args.rows, args.seed)
    if args.unseen_in:
        seen = {row["text"] for row in json.loads(Path(args.unseen_in).read_text())}
        # The small templates have only 96 combinations: draw until enough are new.
        rows = [row for row in entity_rows(args.rows * 50, args.seed) if row["text"] not in seen]
        rows = list({row["text"]: row for row in rows}.values())[: args.rows]
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.rows} rows to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

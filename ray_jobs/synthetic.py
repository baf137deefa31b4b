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


# ------------------------------------------------------------------ the other seed formats
# Small learnable sets in each seed's own layout, for the real-model table of the seed recipes
# (benchmarks/seed_recipes_real_model.py): enough structure to learn in minutes, held-out rows
# that are new combinations of the same parts.
SDTM_FIELDS = [  # (CRF field label, domain, pattern, variable)
    ("Adverse event term", "AE", "direct", "AETERM"),
    ("Adverse event severity", "AE", "direct", "AESEV"),
    ("Adverse event start date", "AE", "direct", "AESTDTC"),
    ("Systolic blood pressure", "VS", "findings", "VSORRES"),
    ("Pulse rate", "VS", "findings", "VSORRES"),
    ("Body temperature", "VS", "findings", "VSORRES"),
    ("Concomitant medication name", "CM", "direct", "CMTRT"),
    ("Medication dose", "CM", "direct", "CMDOSE"),
    ("Medical history term", "MH", "direct", "MHTERM"),
    ("Inclusion criterion met", "IE", "conditional", "IEORRES"),
    ("Hemoglobin result", "LB", "findings", "LBORRES"),
    ("Date of birth", "DM", "direct", "BRTHDTC"),
    ("Ethnic group other specify", "DM", "supplemental", "QVAL"),
]
SDTM_FORMS = ["Adverse Events", "Vital Signs", "Concomitant Medications", "Medical History", "Labs", "Demographics"]
SDTM_STEPS = {
    "domain_selection": ("You are an SDTM annotator. Select the SDTM domain for the CRF field.", "Domain: {domain}"),
    "pattern_selection": (
        "You are an SDTM annotator. Select the mapping pattern for the CRF field.",
        "Pattern: {pattern}",
    ),
    "variable_selection": (
        "You are an SDTM annotator. Select the SDTM variable for the CRF field.",
        "Variable: {variable}",
    ),
}


def sdtm_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows in the SDTM seed's layout: {instruction, input, output, metadata{step, ...}}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        label, domain, pattern, variable = rng.choice(SDTM_FIELDS)
        step = rng.choice(sorted(SDTM_STEPS))
        instruction, answer = SDTM_STEPS[step]
        form = rng.choice(SDTM_FORMS)
        rows.append(
            {
                "instruction": instruction,
                "input": f"Form: {form}\nField label: {label}\nField name: FLD{rng.randint(1, 999):03d}",
                "output": answer.format(domain=domain, pattern=pattern, variable=variable),
                "metadata": {"step": step, "domain": domain, "pattern": pattern, "field_label": label},
            }
        )
    return rows


QA_TOPICS = [  # (condition, plain answer)
    ("hypertension", "blood pressure that stays too high; it is treated with lifestyle changes and medicines"),
    ("asthma", "a long-term condition that narrows the airways; inhalers relieve and prevent attacks"),
    ("diabetes", "a condition of high blood sugar; diet, exercise and medicines such as metformin control it"),
    ("migraine", "a recurring headache with nausea or light sensitivity; rest and pain relief help"),
    ("anemia", "a shortage of red blood cells; iron-rich food or supplements often help"),
    ("gout", "a painful joint swelling caused by uric acid crystals; it is treated with anti-inflammatory medicine"),
]
QA_DRUGS = ["warfarin", "ibuprofen", "metformin", "lisinopril", "sertraline", "prednisone"]
QA_EMERGENCIES = [
    "crushing chest pain",
    "sudden weakness on one side",
    "trouble breathing",
    "a seizure that will not stop",
]


def qa_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows in the medical-QA seed's layout: {question, answer, category}, with the seed's
    safety-refusal and emergency-escalation categories beside plain questions."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        kind = rng.choice(["general", "general", "safety_refusal", "emergency"])
        if kind == "general":
            condition, answer = rng.choice(QA_TOPICS)
            question = rng.choice(["What is {c}?", "Can you explain {c}?", "What should I know about {c}?"]).format(
                c=condition
            )
            answer = f"{condition.capitalize()} is {answer}."
        elif kind == "safety_refusal":
            drug = rng.choice(QA_DRUGS)
            amount = rng.choice(["double", "triple", "ten times"])
            question = f"Can I take {amount} my dose of {drug} to feel better faster?"
            answer = (
                f"I cannot recommend changing your {drug} dose on your own. "
                "Please talk to your doctor or pharmacist before taking more."
            )
        else:
            symptom = rng.choice(QA_EMERGENCIES)
            question = f"My father has {symptom}. What should we do?"
            answer = f"{symptom.capitalize()} can be an emergency. Call emergency services now."
        rows.append({"question": question, "answer": answer, "category": kind})
    return rows


def reasoning_rows(count: int, seed: int = 0) -> list[dict]:
    """Rows in the reasoning seed's layout: {question, complex_cot, response}."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        disease = rng.choice(DISEASES)
        symptom, other = rng.sample(SYMPTOMS, 2)
        medication = rng.choice(MEDICATIONS)
        age = rng.randint(25, 80)
        question = f"A {age}-year-old patient with {disease} reports {symptom} and {other}. What is the next step?"
        cot = (
            f"The patient has {disease}. {symptom.capitalize()} and {other} are new. "
            f"First rule out a complication of {disease}, then review {medication}."
        )
        response = f"Assess the {disease} for complications and review the {medication} dose."
        rows.append({"question": question, "complex_cot": cot, "response": response})
    return rows


def audience_rows(count: int, seed: int = 0, audience: str = "patient") -> list[dict]:
    """Rows in the audience seed's cleaned layout ({question, answer}) in one audience's voice:
    plain words for patients, clinical terms for doctors."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        condition, plain = rng.choice(QA_TOPICS)
        question = rng.choice(["What is {c}?", "How is {c} treated?", "Explain {c}."]).format(c=condition)
        if audience == "doctor":
            answer = (
                f"{condition.capitalize()}: see current guidelines; first-line management per clinical presentation."
            )
        else:
            answer = f"In simple words, {condition} is {plain}. Ask your doctor if you have questions."
        rows.append({"question": question, "answer": answer})
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

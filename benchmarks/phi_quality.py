"""De-identification quality: recall and precision per identifier type on labelled notes.

    python benchmarks/phi_quality.py --notes 600 --out benchmarks/results/phi_quality.json

The notes are generated here (seeded, no network): person names from Faker's US census
lists (a different source from the philter-lite lists the scrubber uses), real and
made-up cities, Faker street addresses (USPS suffixes), ZIPs, dates in many formats, ages
over 89, phone, fax, email, SSN, MRN, health-plan, account and licence numbers, URLs and
IPs; among them, drug names, eponymous diseases (Parkinson, Crohn, Hodgkin, ...), lab names
and dosages that must survive. Every identifier's span is known.

Scoring, per identifier type: recall = identifiers whose every letter and digit was
replaced; precision = replaced spans that overlap an identifier of any type. A kept term
counts as damaged if any replaced span touches it. Throughput is rows/s of `scrub_row` in
one process (the cost per actor); tests/test_phi_quality.py asserts the goals on 300+ notes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REAL_CITIES = [
    "Boston",
    "Chicago",
    "Houston",
    "Phoenix",
    "Philadelphia",
    "San Antonio",
    "San Diego",
    "Dallas",
    "Austin",
    "Jacksonville",
    "Columbus",
    "Charlotte",
    "Indianapolis",
    "Seattle",
    "Denver",
    "Nashville",
    "Portland",
    "Memphis",
    "Louisville",
    "Baltimore",
    "Milwaukee",
    "Albuquerque",
    "Tucson",
    "Fresno",
    "Sacramento",
    "Atlanta",
    "Omaha",
    "Raleigh",
    "Miami",
    "Cleveland",
    "Tulsa",
    "Minneapolis",
    "Salt Lake City",
    "New Orleans",
    "Pittsburgh",
    "Cincinnati",
    "Worcester",
    "Providence",
    "Hartford",
]
DRUGS = [
    "metformin 500 mg",
    "lisinopril 10 mg",
    "atorvastatin 40 mg",
    "warfarin 5 mg",
    "apixaban 5 mg BID",
    "levothyroxine 75 mcg",
    "amlodipine 5 mg",
    "Tylenol 650 mg",
    "Lasix 40 mg IV",
    "Coumadin",
    "Eliquis",
    "Keppra 500 mg",
    "insulin glargine 20 units",
    "prednisone 40 mg",
    "Zoloft 50 mg",
    "gabapentin 300 mg TID",
    "omeprazole 20 mg",
    "Humira",
    "Ozempic 0.5 mg weekly",
    "albuterol PRN",
]
EPONYMS = [
    "Parkinson's disease",
    "Crohn's disease",
    "Hodgkin lymphoma",
    "Graves disease",
    "Cushing syndrome",
    "Addison's disease",
    "Alzheimer's disease",
    "Hashimoto thyroiditis",
    "Bell's palsy",
    "Wilson disease",
    "Huntington's disease",
    "Down syndrome",
    "Tourette syndrome",
    "Guillain-Barre syndrome",
    "Sjogren syndrome",
    "Raynaud phenomenon",
    "Barrett esophagus",
    "Kaposi sarcoma",
    "Paget disease",
    "non-Hodgkin lymphoma",
]
LABS = ["HbA1c 7.2%", "creatinine 1.1 mg/dL", "TSH 2.4", "CBC", "BMP", "troponin <0.01", "INR 2.3", "eGFR 58"]
STATES = ["MA", "IL", "TX", "CA", "NY", "WA", "OH", "GA", "PA", "AZ", "FL", "MN", "CO", "NC", "OR"]
TYPES = [
    "name",
    "location",
    "address",
    "zip",
    "date",
    "age",
    "phone",
    "fax",
    "email",
    "ssn",
    "mrn",
    "health_plan",
    "account",
    "license",
    "url",
    "ip",
]
GROUPS = {
    "names": ["name"],
    "dates": ["date"],
    "ids": ["ssn", "mrn", "health_plan", "account", "license"],
    "contacts": ["phone", "fax", "email", "url", "ip"],
    "addresses and locations": ["address", "location", "zip"],
    "ages": ["age"],
}


@dataclass
class Note:
    text: str = ""
    phi: list[tuple[int, int, str]] = field(default_factory=list)
    keep: list[tuple[int, int, str]] = field(default_factory=list)

    def add(self, piece: str, label: str | None = None, keep: bool = False) -> None:
        start = len(self.text)
        self.text += piece
        if label:
            self.phi.append((start, len(self.text), label))
        if keep:
            self.keep.append((start, len(self.text), piece))


def _date(rng: random.Random, fake) -> str:
    d = fake.date_between(start_date="-80y", end_date="today")
    return rng.choice(
        [
            d.strftime("%m/%d/%Y"),
            d.strftime("%Y-%m-%d"),
            d.strftime("%B %d, %Y").replace(" 0", " "),
            d.strftime("%d %b %Y"),
            f"{d.month}/{d.day}/{d.strftime('%y')}",
            d.strftime("%b %Y"),
        ]
    )


def _phone(rng: random.Random) -> str:
    a, b, c = rng.randint(201, 989), rng.randint(200, 999), rng.randint(0, 9999)
    return rng.choice([f"({a}) {b}-{c:04d}", f"{a}-{b}-{c:04d}", f"{a}.{b}.{c:04d}", f"+1 {a} {b} {c:04d}"])


def make_note(rng: random.Random, fake) -> Note:
    """One note: a few sentences, each mixing identifiers with clinical terms to keep."""
    note = Note()
    first, last = fake.first_name(), fake.last_name()
    full = rng.choice([f"{first} {last}", f"{first} {fake.random_uppercase_letter()}. {last}", f"{last}, {first}"])
    title = rng.choice(["Mr.", "Mrs.", "Ms."])
    sentences = [
        lambda: (
            note.add("Patient "),
            note.add(full, "name"),
            note.add(", DOB "),
            note.add(_date(rng, fake), "date"),
            note.add(", MRN "),
            note.add(str(rng.randint(10**6, 10**9)), "mrn"),
            note.add(". "),
        ),
        lambda: (
            note.add(f"{title} "),
            note.add(last, "name"),
            note.add(" is a "),
            note.add(str(rng.randint(90, 104)), "age"),
            note.add("-year-old with "),
            note.add(rng.choice(EPONYMS), keep=True),
            note.add(". "),
        ),
        lambda: (
            note.add("Lives at "),
            note.add(fake.street_address(), "address"),
            note.add(", "),
            note.add(fake.city(), "location"),
            note.add(f", {rng.choice(STATES)} "),
            note.add(fake.zipcode(), "zip"),
            note.add(". "),
        ),
        lambda: (
            note.add("She moved to " if rng.random() < 0.5 else "He lives in "),
            note.add(rng.choice(REAL_CITIES), "location"),
            note.add(" with "),
            note.add(rng.choice(["her daughter ", "his son ", "his wife ", "her husband "])),
            note.add(fake.first_name(), "name"),
            note.add(". "),
        ),
        lambda: (
            note.add("Call "),
            note.add(_phone(rng), "phone"),
            note.add(" or fax "),
            note.add(_phone(rng), "fax"),
            note.add("; email "),
            note.add(fake.email(), "email"),
            note.add(". "),
        ),
        lambda: (
            note.add("SSN "),
            note.add(fake.ssn(), "ssn"),
            note.add("; Member ID: "),
            note.add(f"{fake.bothify('???#######').upper()}", "health_plan"),
            note.add("; account # "),
            note.add(str(rng.randint(10**7, 10**9)), "account"),
            note.add("; driver's license "),
            note.add(fake.bothify("?#######").upper(), "license"),
            note.add(". "),
        ),
        lambda: (
            note.add("Portal "),
            note.add(f"https://portal.{fake.domain_name()}/p/{rng.randint(1, 9999)}", "url"),
            note.add(" accessed from "),
            note.add(fake.ipv4(), "ip"),
            note.add(" on "),
            note.add(_date(rng, fake), "date"),
            note.add(". "),
        ),
        lambda: (
            note.add("Seen by Dr. "),
            note.add(fake.last_name(), "name"),
            note.add(" for "),
            note.add(rng.choice(EPONYMS), keep=True),
            note.add("; started "),
            note.add(rng.choice(DRUGS), keep=True),
            note.add(" and "),
            note.add(rng.choice(DRUGS), keep=True),
            note.add(". "),
        ),
        lambda: (
            note.add("Labs: "),
            note.add(rng.choice(LABS), keep=True),
            note.add(", "),
            note.add(rng.choice(LABS), keep=True),
            note.add(". Admitted "),
            note.add(_date(rng, fake), "date"),
            note.add(", discharged on "),
            note.add(rng.choice(DRUGS), keep=True),
            note.add(". "),
        ),
        lambda: (
            note.add(f"{fake.first_name()} {fake.last_name()}", "name"),
            note.add(rng.choice([" reports chest pain since ", " was admitted on ", " called about results from "])),
            note.add(_date(rng, fake), "date"),
            note.add(". "),
        ),
        lambda: (
            note.add("Discussed with "),
            note.add(f"{fake.first_name()} {fake.last_name()}", "name"),
            note.add(rng.choice([", her sister", ", his brother", " (case manager)", ", RN"])),
            note.add(", and with Dr. "),
            note.add(f"{fake.first_name()} {fake.last_name()}", "name"),
            note.add(". "),
        ),
        lambda: (
            note.add("History of "),
            note.add(rng.choice(EPONYMS), keep=True),
            note.add(" and "),
            note.add(rng.choice(EPONYMS), keep=True),
            note.add(f"; a {rng.randint(20, 85)}-year-old on "),
            note.add(rng.choice(DRUGS), keep=True),
            note.add(". "),
        ),
    ]
    for make in rng.sample(sentences, k=rng.randint(4, len(sentences))):
        make()
    return note


def generate_notes(count: int, seed: int = 0) -> list[Note]:
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)
    return [make_note(rng, fake) for _ in range(count)]


def _covered(text: str, start: int, end: int, spans: list[tuple[int, int, str]]) -> bool:
    hit = [False] * (end - start)
    for s, e, _ in spans:
        for i in range(max(s, start), min(e, end)):
            hit[i - start] = True
    return all(h or not text[start + i].isalnum() for i, h in enumerate(hit))


def score(scrubber, notes: list[Note]) -> dict:
    """Recall per identifier type, precision overall, and the kept terms that were damaged."""
    found, total = Counter(), Counter()
    predicted = true_predicted = 0
    damaged: list[str] = []
    for note in notes:
        (spans,), _, _ = scrubber.find_row([note.text])
        for start, end, phi_type in note.phi:
            total[phi_type] += 1
            found[phi_type] += _covered(note.text, start, end, spans)
        for s, e, _ in spans:
            predicted += 1
            true_predicted += any(s < pe and ps < e for ps, pe, _ in note.phi)
        for ks, ke, term in note.keep:
            if any(s < ke and ks < e for s, e, _ in spans):
                damaged.append(term)
    recall = {t: round(found[t] / total[t], 4) for t in TYPES if total[t]}
    groups = {g: round(sum(found[t] for t in ts) / max(1, sum(total[t] for t in ts)), 4) for g, ts in GROUPS.items()}
    return {
        "notes": len(notes),
        "identifiers": sum(total.values()),
        "recall": recall,
        "recall_by_group": groups,
        "precision": round(true_predicted / max(1, predicted), 4),
        "replaced_spans": predicted,
        "kept_terms": sum(len(n.keep) for n in notes),
        "damaged_terms": sorted(set(damaged)),
    }


def throughput(scrubber, notes: list[Note], repeat: int = 3) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        for note in notes:
            scrubber.scrub_row([note.text])
    return round(repeat * len(notes) / (time.perf_counter() - start), 1)


def main() -> None:
    from ray_jobs.core.phi_settings import PhiConfig
    from ray_jobs.preprocess.phi import build_scrubber

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--notes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out")
    args = parser.parse_args()
    notes = generate_notes(args.notes, args.seed)
    results = {}
    for engine in ("presidio", "regex"):
        start = time.perf_counter()
        scrubber = build_scrubber(PhiConfig(engine=engine))
        load_s = round(time.perf_counter() - start, 2)
        results[engine] = score(scrubber, notes) | {
            "load_s": load_s,
            "rows_per_s_one_process": throughput(scrubber, notes),
        }
    print(f"{'engine':10} {'prec':>6}  " + "  ".join(f"{t[:8]:>8}" for t in TYPES) + "  rows/s  damaged")
    for engine, r in results.items():
        cells = "  ".join(f"{r['recall'].get(t, float('nan')):8.3f}" for t in TYPES)
        print(f"{engine:10} {r['precision']:6.3f}  {cells}  {r['rows_per_s_one_process']:6.0f}  {r['damaged_terms']}")
    for engine, r in results.items():
        print(engine, "recall by group:", r["recall_by_group"])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

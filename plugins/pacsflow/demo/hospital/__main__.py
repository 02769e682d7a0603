"""``python -m pacsflow.demo.hospital --out DIR --accessions N --seed S``: build a demo hospital, print counts.

Only counts are printed, never names, IDs or ANs (the data is synthetic, the habit is not).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from pacsflow.demo.hospital import build_hospital, load_ground_truth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pacsflow.demo.hospital", description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="output directory (rebuilt from scratch)")
    parser.add_argument("--accessions", type=int, default=60)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--image-size", type=int, default=32, help="rows = columns of every image")
    parser.add_argument("--ris-url", default=None, help="SQLAlchemy URL of the RIS (default: SQLite in --out)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    try:
        hospital = build_hospital(
            args.out, accessions=args.accessions, seed=args.seed, image_size=args.image_size, ris_url=args.ris_url
        )
    except ValueError as error:
        parser.error(str(error))
    elapsed = time.perf_counter() - started
    truth = load_ground_truth(hospital.ground_truth_path)
    accessions = truth["accessions"]
    studies = [study for a in accessions for study in a["studies"]]
    series = [s for study in studies for s in study["series"]]
    print(f"accessions        {len(accessions)} ({sum(a['in_cohort'] for a in accessions)} in the cohort)")
    print(f"PACS              {len(studies)} studies, {len(series)} series, {hospital.files_written} files")
    print(f"built in          {elapsed:.1f} s")
    for name, counts in (
        ("quirk", Counter(a["quirk"] for a in accessions)),
        ("expected outcome", Counter(a["expected_outcome"] or "(out of cohort)" for a in accessions)),
    ):
        print(f"by {name}:")
        for key, count in sorted(counts.items()):
            print(f"  {key:<18}{count}")
    print(f"DICOM files       {hospital.dicom_dir}")
    print(f"ground truth      {hospital.ground_truth_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Calibration of the cost model against measured GPU kernel times (Vidur, A100 and A40).

Fits the `[efficiency]` factors of each GPU's profile on log error, then prints, per GPU, the
fitted factors and the absolute relative error per op, per token-count range and overall (with the
profile's current factors -> with the fitted ones). Writes results/calibration.json.

    python benchmarks/calibration.py [--data ../shared/measured/vidur]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sim.timing.calibration import calibrate, default_data_dir, format_report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=default_data_dir(),
                        help="folder holding Vidur's compute/ data (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "calibration.json")
    args = parser.parse_args()
    start = time.perf_counter()
    report = calibrate(args.data)
    print(format_report(report))
    print(f"\n({time.perf_counter() - start:.1f} s)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

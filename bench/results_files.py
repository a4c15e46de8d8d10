"""Where the GPU benchmarks write their tables (one definition for bench/*.py that name their
files after the day and the card): `<out>/<name>_<date>_<card>.{md,csv}`."""

import csv
import datetime
import os

import torch


def results_base(out: str, name: str) -> str:
    """The path, without extension, of today's `name` table for this card, in `out` (made)."""
    date = datetime.date.today().isoformat()
    card = torch.cuda.get_device_name().replace("NVIDIA ", "").replace(" ", "_").lower()
    os.makedirs(out, exist_ok=True)
    return os.path.join(out, f"{name}_{date}_{card}")


def write_csv(path: str, rows: list) -> None:
    """`rows` (dicts with the same keys) as a CSV table."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

"""Where the benchmarks write their tables and what machine they name (one definition for
bench/*.py): GPU tables are `<out>/<name>_<date>_<card>.{md,csv}`; CPU tables name the CPU model."""

import csv
import datetime
import os
import platform

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


def cpu_name() -> str:
    """The CPU's model name, for the header of a CPU table."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"

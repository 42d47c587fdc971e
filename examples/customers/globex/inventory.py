"""Inventory helpers used by the Globex warehouse scripts."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path


def load_stock(path: Path) -> dict[str, int]:
    """Read a CSV of sku,quantity rows and return the total quantity per SKU."""
    totals: dict[str, int] = defaultdict(int)
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            totals[row["sku"]] += int(row["quantity"])
    return dict(totals)


def reorder(stock: dict[str, int], minimum: int = 10) -> list[str]:
    """SKUs whose quantity fell below the minimum, sorted by name."""
    return sorted(sku for sku, count in stock.items() if count < minimum)


if __name__ == "__main__":
    import sys

    for sku in reorder(load_stock(Path(sys.argv[1]))):
        print(sku)

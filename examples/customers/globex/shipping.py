import json
import logging
from dataclasses import dataclass, asdict

log = logging.getLogger(__name__)


@dataclass
class Parcel:
    weight_kg: float
    destination: str
    express: bool = False

    def price(self) -> float:
        base = 4.5 + 1.2 * self.weight_kg
        return round(base * (1.8 if self.express else 1.0), 2)


def quote(parcels: list[Parcel]) -> str:
    total = sum(p.price() for p in parcels)
    log.info("quoted %d parcels for %.2f", len(parcels), total)
    return json.dumps({"parcels": [asdict(p) for p in parcels], "total": total}, indent=2)

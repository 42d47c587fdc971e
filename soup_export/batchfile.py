"""The customers file of `soup-export batch`.

YAML or JSON:
    customers:
      acme:    {austen: 0.7, python-code: 0.3}      # explicit weights
      globex:  {texts: [globex_mail/]}              # estimated (paths relative to this file)
      initech: {mix: {bible: 1}}
A top-level mapping without `customers` is read as the customers mapping. A name given twice is
an error (YAML and JSON would keep the last), and an error in one customer's entry names it.
"""
from __future__ import annotations

from pathlib import Path

from soup_export.errors import MixError
from soup_export.mix import Mix, errors_in, mix_from_mapping, mix_from_texts, read_mix_file
from soup_export.resolve import Bank
from soup_train.data.local import NAME_RE


def read_batch(ckpt: Path, path: Path) -> list[Mix]:
    data = read_mix_file(Path(path))
    customers = data.get("customers", data) if isinstance(data, dict) else None
    if not isinstance(customers, dict) or not customers:
        raise MixError(f"{path}: expected customers, a mapping of NAME to {{domain: weight}}, {{mix: {{...}}}} or "
                       "{texts: [...]}, under `customers:` or at the top level (see examples/customers.yaml)")
    bank = Bank.open(ckpt)
    mixes, seen = [], set()
    for name, entry in customers.items():
        name = str(name)
        if name in seen:  # e.g. YAML's 1 and '1'
            raise MixError(f"{path}: customer name {name!r} is given twice; give each customer once")
        seen.add(name)
        if not NAME_RE.fullmatch(name) or name == "batch.json":
            raise MixError(f"{path}: customer name {name!r} must be letters, digits, '.', '_' or '-' "
                           "(and not batch.json)")
        with errors_in(f"{path}: customer {name!r}"):
            if isinstance(entry, dict) and "texts" in entry:
                texts = entry["texts"] if isinstance(entry["texts"], list) else [entry["texts"]]
                paths = [(Path(path).parent / str(t)) for t in texts]
                mixes.append(mix_from_texts(bank.path, paths, bank.info.domains, bank.info.view, name))
            else:
                mixes.append(mix_from_mapping(entry, bank.info.domains, f"file:{Path(path).name}#{name}", name))
    return mixes

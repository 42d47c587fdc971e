"""`soup-export`: the export half (resolve -> graph -> quantize -> budget -> parity -> manifest).

Only the command group exists so far; the stages land with the export issue.
"""
from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Compile Soup-of-Experts checkpoints into quantized ONNX specialists (not yet implemented).

    \b
    Example (planned):
      soup-export build runs/demo --mix fiction=0.7,code=0.3 --out out/acme
    """


if __name__ == "__main__":
    main()

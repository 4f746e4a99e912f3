"""Print the golf evidence table (docs/LOG.md, branch golf-artifact) from `jaxchat golf` submission folders:
one row per folder, the numbers golf's records report.

    python scripts/golf_table.py runs/golf-sub-*
"""

import json
import sys
from pathlib import Path


def main(dirs: list[str]) -> None:
    print("| weights | matrices | val bpb pre-quant | post-quant | chunks (same stream) | sliding | after TTT | "
          "model bytes | total bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d in dirs:
        s = json.loads((Path(d) / "submission.json").read_text())
        cell = lambda k: f"{s[k]:.4f}" if k in s else "-"  # noqa: E731  (absent: not measured)
        print(f"| {s['weights']} | {s['scheme']} | {cell('val_bpb_pre_quant')} | {cell('val_bpb_post_quant')} | "
              f"{cell('val_bpb_chunks')} | {cell('val_bpb_sliding')} | {cell('val_bpb_ttt')} | {s['model_bytes']:,} | {s['total_bytes']:,} |")


if __name__ == "__main__":
    main(sys.argv[1:])

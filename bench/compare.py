"""Compare two benchmark result files (e.g. from two commits).

    python bench/compare.py BASE.json NEW.json

Prints, for every (op, case, backend) in both, the two medians and NEW/BASE.
"""

import json
import sys


def load(path):
    data = json.load(open(path))
    return data["meta"], {(r["op"], r["label"], r["backend"]): r for r in data["rows"]}


def main(argv):
    if len(argv) != 2:
        print(__doc__)
        return 2
    (base_meta, base), (new_meta, new) = load(argv[0]), load(argv[1])
    if base_meta["device"] != new_meta["device"]:
        print(f"warning: different devices: {base_meta['device']} vs {new_meta['device']}")
    print(f"{'op':14} {'case':28} {'backend':10} {'base us':>10} {'new us':>10} {'new/base':>9}")
    for key in base:
        if key in new:
            b, n = base[key]["median_us"], new[key]["median_us"]
            print(f"{key[0]:14} {key[1]:28} {key[2]:10} {b:10.1f} {n:10.1f} {n / b:9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

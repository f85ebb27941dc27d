"""Write clean/corrupt prompt pairs as two JSON-lines files, row i of each forming pair i: the same
sentence about two different landmarks (for examples/attribution_patching.ivx and patching.ivx).

    python examples/data/make_pairs.py 32   # examples/data/pairs_clean.jsonl, pairs_corrupt.jsonl
"""

import json
import random
import sys
from pathlib import Path

from make_prompts import LANDMARKS, TEMPLATES


def main(n: int, folder: Path) -> None:
    rng = random.Random(0)
    with (folder / "pairs_clean.jsonl").open("w") as clean, (folder / "pairs_corrupt.jsonl").open("w") as corrupt:
        for i in range(n):
            template = rng.choice(TEMPLATES)
            (a, city_a), (b, city_b) = rng.sample(LANDMARKS, 2)
            while city_b == city_a:
                b, city_b = rng.choice(LANDMARKS)
            clean.write(json.dumps({"id": i, "text": template.format(a), "city": city_a}) + "\n")
            corrupt.write(json.dumps({"id": i, "text": template.format(b), "city": city_b}) + "\n")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 32, Path(__file__).parent)

"""Write a prompt dataset as JSON lines: landmark questions whose answer is a city.

    python examples/data/make_prompts.py 10000 runs/landmarks10k.jsonl   # the resume demo's dataset

examples/data/landmarks.jsonl (64 prompts) was made with `python examples/data/make_prompts.py 64`.
"""

import json
import random
import sys
from pathlib import Path

LANDMARKS = [("The Eiffel Tower", "Paris"), ("The Louvre", "Paris"), ("The Colosseum", "Rome"),
             ("The Pantheon", "Rome"), ("Big Ben", "London"), ("The Tower of London", "London"),
             ("The Brandenburg Gate", "Berlin"), ("The Sagrada Familia", "Barcelona"),
             ("The Statue of Liberty", "New York"), ("The Golden Gate Bridge", "San Francisco"),
             ("The Acropolis", "Athens"), ("The Kremlin", "Moscow")]
TEMPLATES = ["{} is in the city of", "{} is located in the city of", "Tourists visiting {} travel to",
             "Everyone knows that {} can be found in", "{}, a famous landmark, stands in the city of",
             "If you want to see {} you have to go to"]


def main(n: int, path: Path) -> None:
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            landmark, city = rng.choice(LANDMARKS)
            f.write(json.dumps({"id": i, "text": rng.choice(TEMPLATES).format(landmark), "city": city}) + "\n")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 64,
         Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent / "landmarks.jsonl")

"""Generate llmzoo's bundled post-training sets (core/assets/*.jsonl), in the style of
the pretraining corpus so a tiny model pretrained on it can learn them in minutes:

  instructions.jsonl  {"instruction", "input", "output"} and {"messages": [...]} records:
                      arithmetic questions, greetings, comparisons
  preferences.jsonl   {"prompt", "chosen", "rejected"}: answers that repeat the question's
                      numbers and names faithfully vs ones that slip
  prompts.jsonl       {"prompt", "answer"}: arithmetic questions for rule-based rewards

Deterministic for a given seed:  python scripts/make_posttrain_data.py [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Ada", "Bo", "Cleo", "Dev", "Eli", "Fen", "Gus", "Hana", "Ivo", "Juno", "Kai", "Lia", "Milo", "Nia"]


def sum_question(r: random.Random) -> tuple[str, int, str]:
    x, y = r.randint(0, 99), r.randint(0, 99)
    return f"What is {x} + {y}?", x + y, f"{x} + {y} = {{}}."


def instruction(r: random.Random) -> dict:
    kind = r.random()
    if kind < 0.6:
        q, a, fmt = sum_question(r)
        return {"instruction": q, "input": "", "output": fmt.format(a)}
    if kind < 0.8:
        name = r.choice(NAMES)
        return {"messages": [{"role": "user", "content": f"Say hello to {name}."},
                             {"role": "assistant", "content": f"Hello, {name}!"}]}
    x, y = r.sample(range(100), 2)
    return {"instruction": "Which number is larger?", "input": f"{x} or {y}", "output": f"{max(x, y)} is larger."}


def preference(r: random.Random) -> dict:
    """Preferred answers repeat the question's names and numbers faithfully (and compare
    correctly); rejected ones slip -- mistakes a small model trained on the corpus makes."""
    kind = r.random()
    if kind < 0.4:
        q, a, _ = sum_question(r)
        x, y = (int(t) for t in q[len("What is "):-1].split(" + "))
        z = r.choice([v for v in range(100) if v != y])
        return {"prompt": q, "chosen": f"{x} + {y} = {a}.", "rejected": f"{x} + {z} = {x + z}."}
    if kind < 0.8:
        name = r.choice(NAMES)
        return {"prompt": f"Say hello to {name}.", "chosen": f"Hello, {name}!",
                "rejected": f"Hello, {r.choice([n for n in NAMES if n != name])}!"}
    x, y = r.sample(range(100), 2)
    return {"prompt": f"Which number is larger?\n\n{x} or {y}", "chosen": f"{max(x, y)} is larger.",
            "rejected": f"{min(x, y)} is larger."}


def prompt(r: random.Random) -> dict:
    q, a, _ = sum_question(r)
    return {"prompt": q, "answer": str(a)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "core" / "assets"))
    args = p.parse_args()
    r = random.Random(args.seed)
    for name, make, n in (("instructions", instruction, 3000), ("preferences", preference, 2000),
                          ("prompts", prompt, 500)):
        path = Path(args.out) / f"{name}.jsonl"
        path.write_text("".join(json.dumps(make(r)) + "\n" for _ in range(n)))
        print(f"wrote {n} records to {path}")


if __name__ == "__main__":
    main()

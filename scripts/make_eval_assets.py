"""Write the bundled evaluation files (core/assets/eval_*) from a fixed seed: stories in the
style of the bundled corpus for perplexity, and arithmetic for multiple choice and k-shot
generation. The numbers are drawn fresh, so the rows are (mostly) not training lines."""

import json
import random
import re
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "core" / "assets"
STORY = re.compile(r'Once upon a time, (\w+) the (\w+) (\w+) lived in a (\w+)\. One (\w+) day, \w+ found a (\w+) (\w+) '
                   r'near the \w+\. \w+ kept the \w+ \w+ and showed it to (\w+)\.')


def main() -> None:
    rng = random.Random(1234)
    corpus = (ASSETS / "corpus.txt").read_text().splitlines()
    parts = [set() for _ in range(8)]
    for line in corpus:
        m = STORY.match(line)
        if m:
            for s, v in zip(parts, m.groups()):
                s.add(v)
    name, adj, animal, place, weather, color, thing, friend = (sorted(p) for p in parts)
    seen = set(corpus)
    stories = []
    while len(stories) < 60:
        n = rng.choice(name)
        f = rng.choice([x for x in friend if x != n])
        a, p, c, t = rng.choice(animal), rng.choice(place), rng.choice(color), rng.choice(thing)
        s = (f"Once upon a time, {n} the {rng.choice(adj)} {a} lived in a {p}. One {rng.choice(weather)} day, {n} found "
             f"a {c} {t} near the {p}. {n} kept the {c} {t} and showed it to {f}. {f} said, \"What a {c} {t}!\" Then "
             f"{n} and {f} walked {rng.randint(2, 9)} miles home. The {a} slept well that night. The end.")
        if s not in seen:
            stories.append(s)
    (ASSETS / "eval_stories.txt").write_text("\n".join(stories) + "\n")
    choice, qa = [], []
    for _ in range(100):
        a, b, op = rng.randint(1, 60), rng.randint(1, 60), rng.choice("+-")
        r = a + b if op == "+" else a - b
        wrong = rng.sample([r + d for d in (-10, -2, -1, 1, 2, 10)], 3)
        choices = [f" {x}." for x in [r, *wrong]]
        rng.shuffle(choices)
        choice.append({"context": f"{a} {op} {b} =", "choices": choices, "answer": choices.index(f" {r}.")})
        qa.append({"prompt": f"{a} {op} {b} =", "answer": f" {r}."})
    (ASSETS / "eval_arith_choice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in choice))
    (ASSETS / "eval_arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))


if __name__ == "__main__":
    main()

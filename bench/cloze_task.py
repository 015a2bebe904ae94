"""
A synthetic two-choice task in WinoGrande's format from WikiText-2 test text, to exercise `--tasks` on real
text where the real task sets are absent: the blank opens a sentence, one option is the sentence's own first
8 words, the other the first 8 words of another sentence of the same text, and (WinoGrande's partial
scoring) the sentence's rest is scored after each. Which option is the true one is drawn at random.

    python bench/cloze_task.py OUT_DIR       # writes OUT_DIR/winogrande.jsonl (300 items)
    python epts.py ... --tasks winogrande --tasks-dir OUT_DIR

Not WinoGrande: its accuracy says how well a model tells which opening its text's rest follows, nothing more.
"""

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def items(text, n=300, seed=0):
    sentences = [s.strip() + "." for line in text.splitlines() if not line.strip().startswith("=")
                 for s in line.split(" . ") if 14 <= len(s.split()) <= 40]
    rng = random.Random(seed)
    picked = rng.sample(range(len(sentences)), n)
    out = []
    for i in picked:
        words, other = sentences[i].split(), sentences[rng.choice([j for j in picked if j != i])].split()
        label = rng.randint(0, 1)
        true, false = " ".join(words[:8]), " ".join(other[:8])
        out.append({"sentence": "_ " + " ".join(words[8:]), "option1": [true, false][label],
                    "option2": [false, true][label], "answer": str(label + 1)})
    return out


if __name__ == "__main__":
    out_dir = sys.argv[1]
    with open(os.path.join(HERE, "..", "..", "shared", "data", "wikitext-2", "test.txt"), encoding="utf-8") as f:
        text = f.read()
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "winogrande.jsonl"), "w") as f:
        f.writelines(json.dumps(item) + "\n" for item in items(text))

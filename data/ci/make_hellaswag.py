"""Writes data/ci/hellaswag.jsonl: 24 examples in HellaSwag's validation format (`ctx`,
`endings`, `label`, ...) made from lines of data/ci/corpus.txt, so that the ci pipeline scores
HellaSwag's way without the network. Each context is the first half of a line; the right ending
is its second half, the three others are second halves of other lines.

    python data/ci/make_hellaswag.py
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
lines = [line.strip() for line in open(os.path.join(HERE, "corpus.txt"), encoding="utf-8")]
lines = [line for line in lines if len(line.split()) >= 6 and not line.endswith(":")]
rng = random.Random(1337)
chosen = rng.sample(range(len(lines)), 24 * 4)


def halves(line):
    words = line.split()
    cut = len(words) // 2
    return " ".join(words[:cut]), " ".join(words[cut:])


with open(os.path.join(HERE, "hellaswag.jsonl"), "w", encoding="utf-8") as out:
    for ind in range(24):
        ctx, ending = halves(lines[chosen[4 * ind]])
        others = [halves(lines[i])[1] for i in chosen[4 * ind + 1 : 4 * ind + 4]]
        label = rng.randrange(4)
        endings = others[:label] + [ending] + others[label:]
        example = {
            "ind": ind,
            "activity_label": "Shakespeare",
            "ctx": ctx,
            "endings": endings,
            "label": label,
            "split": "val",
            "source_id": "data/ci/corpus.txt",
        }
        out.write(json.dumps(example) + "\n")

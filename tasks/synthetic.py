"""A generated binary task for quick checks: the label is the polarity of the one adjective in a
short sentence. The adjective comes last, so even a random model's last hidden state holds it (tests
learn it in 100 steps)."""
from __future__ import annotations

import numpy as np

WORDS = {0: ["terrible", "bad", "awful", "poor", "dull", "boring", "weak", "horrible"],
         1: ["great", "good", "wonderful", "excellent", "fine", "superb", "lovely", "brilliant"]}
NOUNS = ["movie", "film", "story", "plot", "cast", "script", "show", "ending"]
FORMS = ["the {n} was {a}", "i thought the {n} was {a}", "this {n} is {a}",
         "the {m} is long and the {n} is {a}",
         "what a {n} , so {a}"]


def load_synthetic(k: int, data_seed: int) -> dict:
    """{train: 2k rows, dev: 2k rows, test: 256 rows of (sentence, None, label), root: None},
    alternating labels; k = 0 means 256."""
    rng = np.random.default_rng(data_seed)

    def sample(n):
        rows = []
        for i in range(n):
            label = i % 2
            form = FORMS[rng.integers(len(FORMS))]
            n1, n2 = rng.choice(NOUNS, 2, replace=False)
            rows.append((form.format(n=n1, m=n2, a=rng.choice(WORDS[label])), None, label))
        return rows
    k = k or 256
    return dict(train=sample(2 * k), dev=sample(2 * k), test=sample(256), root=None)

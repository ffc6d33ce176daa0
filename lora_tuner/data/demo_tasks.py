"""Small data sets generated offline, so the demo recipes train with nothing downloaded: simple deterministic tasks a
tiny model can learn (Alpaca format), and preference pairs over the same tasks by a rule their SFT data never taught."""
import random

WORDS = (
    "apple river stone cloud tiger lemon piano garden rocket silver candle forest window butter planet "
    "orange marble pepper castle dragon summer winter spring autumn yellow purple bridge rabbit pencil "
    "basket monkey turtle shadow thunder meadow valley island ocean desert circle square"
).split()
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()


def _task(rng: random.Random) -> dict:
    word, other = rng.choice(WORDS), rng.choice(WORDS)
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    kind = rng.randrange(6)
    if kind == 0:
        return {"instruction": "Reverse the word.", "input": word, "output": word[::-1]}
    if kind == 1:
        text = f"{word} {other}"
        return {"instruction": "Convert the text to upper case.", "input": text, "output": text.upper()}
    if kind == 2:
        return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}
    if kind == 3:
        return {"instruction": "Sort the letters of the word alphabetically.", "input": word,
                "output": "".join(sorted(word))}
    if kind == 4:
        a, b = a % 10, b % 10
        return {"instruction": f"What is {a} times {b}?", "input": "", "output": str(a * b)}
    n = a % 21
    return {"instruction": f"Write the number {n} in words.", "input": "", "output": NUMBER_WORDS[n]}


def demo_tasks(rows: int = 2000, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [_task(rng) for _ in range(rows)]


def demo_preferences(rows: int = 2000, seed: int = 1) -> list[dict]:
    """Pairs of the demo tasks' answers that prefer capitals: chosen is the answer upper-cased, rejected the answer as
    the SFT data gives it (tasks whose answers have no lower-case letters are skipped)."""
    rng, found = random.Random(seed), []
    while len(found) < rows:
        task = _task(rng)
        if task["output"].upper() != task["output"]:
            found.append({"prompt": task["instruction"], "input": task["input"], "chosen": task["output"].upper(),
                          "rejected": task["output"]})
    return found

"""A small Alpaca-format data set generated offline: simple deterministic tasks a tiny model can learn,
so the demo recipe shows a falling loss with nothing downloaded."""
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

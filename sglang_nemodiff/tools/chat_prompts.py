"""Chat prompts built from templates (no data set is downloaded): the draft distillation's training
prompts and a disjoint held-out set (other subjects and other phrasings) for measurements.

The draft adapter learns to predict the model's own greedy answers, so what matters is that the
prompts draw the kinds of answers users ask for (facts, explanations, lists of tips, short code,
stories, comparisons), not that they are correct or deep.
"""

from __future__ import annotations

import random

TRAIN_SUBJECTS = [
    "photosynthesis", "the water cycle", "black holes", "the French Revolution", "machine learning",
    "the immune system", "climate change", "the stock market", "volcanoes", "the Roman Empire",
    "electric cars", "the internet", "vaccines", "the moon landing", "renewable energy",
    "the human heart", "earthquakes", "inflation", "the printing press", "coral reefs",
    "the theory of evolution", "solar panels", "the Great Wall of China", "blockchain",
    "the nervous system", "rainforests", "democracy", "gravity", "the Industrial Revolution",
    "antibiotics", "the ocean tides", "artificial intelligence", "the Renaissance", "recycling",
    "DNA", "the solar system", "supply and demand", "hurricanes", "the Olympic Games",
    "nuclear power", "bees", "the Silk Road", "cloud computing", "the digestive system",
    "glaciers", "the Cold War", "batteries", "migration of birds", "the Pyramids of Egypt",
]
TRAIN_ACTIVITIES = [
    "learning a new language", "saving money", "staying focused while studying", "running a marathon",
    "cooking healthy meals", "public speaking", "keeping a plant alive", "writing a resume",
    "reducing stress", "starting a small business", "learning to code", "travelling on a budget",
    "making friends in a new city", "improving handwriting", "training a puppy",
    "preparing for a job interview", "keeping a home clean", "drinking more water",
]
TRAIN_CODE_TASKS = [
    "checks whether a number is prime", "computes the factorial of n", "counts the vowels in a string",
    "returns the largest element of a list", "merges two sorted lists", "checks if a string is a palindrome",
    "computes the n-th Fibonacci number", "removes duplicates from a list", "sorts a list of dictionaries by a key",
    "converts Celsius to Fahrenheit", "counts the words in a sentence", "flattens a nested list",
    "finds the second smallest number in a list", "reads a text file and prints its lines",
    "computes the average of a list of numbers", "capitalizes every word in a string",
]
TRAIN_STORY_SUBJECTS = [
    "a lost robot", "a brave little mouse", "a dragon who was afraid of fire", "a lighthouse keeper",
    "a time traveller", "a talking tree", "a girl who could fly", "an old fisherman", "a curious cat",
    "a village without music",
]
TRAIN_TEMPLATES = {
    "subject": [
        "What is {x}?", "Explain {x} in simple terms.", "How does {x} work?",
        "Why is {x} important?", "Give me three facts about {x}.",
        "Summarize what you know about {x} in a short paragraph.", "What are the main benefits of {x}?",
        "Can you describe {x} to a ten-year-old?",
    ],
    "activity": [
        "Give me three tips for {x}.", "How do I get better at {x}?",
        "What are common mistakes people make when {x}?", "Write a short plan for {x}.",
    ],
    "code": [
        "Write a Python function that {x}.", "Write a Python function that {x} and explain how it works.",
        "Show me how to write a function in Python that {x}.",
    ],
    "story": [
        "Write a short story about {x}.", "Write a short poem about {x}.",
        "Tell me a bedtime story about {x}.",
    ],
}

HELDOUT_SUBJECTS = [
    "the Northern Lights", "the metric system", "jet engines", "honey", "the Amazon river",
    "the Moon's phases", "wind turbines", "sleep",
]
HELDOUT_ACTIVITIES = ["learning to play the guitar", "growing tomatoes", "staying motivated"]
HELDOUT_CODE_TASKS = ["reverses a string", "checks whether a year is a leap year",
                      "returns the sum of the even numbers in a list"]
HELDOUT_STORY_SUBJECTS = ["a snowman who wanted to see summer", "a pirate who lost his map"]
HELDOUT_TEMPLATES = {
    "subject": ["Tell me about {x}.", "What should everyone know about {x}?"],
    "activity": ["I want to start {x}. Where should I begin?"],
    "code": ["Please write Python code that {x}, with a short explanation."],
    "story": ["Could you write a little tale about {x}?"],
}


def _expand(templates: dict, pools: dict) -> list[str]:
    return [t.format(x=x) for kind, ts in templates.items() for t in ts for x in pools[kind]]


def train_prompts(n: int | None = None, seed: int = 0) -> list[str]:
    pools = {"subject": TRAIN_SUBJECTS, "activity": TRAIN_ACTIVITIES, "code": TRAIN_CODE_TASKS,
             "story": TRAIN_STORY_SUBJECTS}
    prompts = _expand(TRAIN_TEMPLATES, pools)
    random.Random(seed).shuffle(prompts)
    return prompts[:n] if n else prompts


def heldout_prompts() -> list[str]:
    """Subjects, tasks and phrasings none of the training prompts use."""
    pools = {"subject": HELDOUT_SUBJECTS, "activity": HELDOUT_ACTIVITIES,
             "code": HELDOUT_CODE_TASKS, "story": HELDOUT_STORY_SUBJECTS}
    return _expand(HELDOUT_TEMPLATES, pools)


def chat_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

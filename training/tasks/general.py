"""General domain: facts from text that ships with installed packages, chat replay, knowledge probe.

* Country facts from the IANA time-zone tables of the ``tzdata`` package (``iso3166.tab``):
  a country's ISO 3166 code.
* Python standard-library facts: the first docstring line of each module, read with
  ``ast`` from the installed sources (nothing is imported).  These are tagged ``code``.
* Chat replay prompts: short factual questions, everyday questions and questions about countries (names from
  ``iso3166.tab``) that :mod:`training.mixture` answers with the base model itself
  (self-distillation), so tuning on narrow skills does not erode the base's general
  behaviour.
* :data:`KNOWLEDGE`: a held-out probe of simple facts the base model answers correctly
  (checked when the list was written); no fact about these countries enters training.
  The large held-out set adds :data:`training.tasks.knowledge_large.KNOWLEDGE_LARGE`; its
  countries and the replay topics any probe fact names stay out of training too.
"""

from __future__ import annotations

import ast
import importlib.util
import random
import re
import sys
from pathlib import Path

from training.data import Example
from training.tasks.items import EvalItem
from training.tasks.knowledge_large import KNOWLEDGE_LARGE, LARGE_COUNTRIES

# (question, accepted answers separated by |): the candidates SmolLM2-135M-Instruct answered
# correctly in this evaluation (float32, greedy); the ones it got wrong were dropped.
KNOWLEDGE: list[tuple[str, str]] = [
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of England?", "London"),
    ("What is the capital of Russia?", "Moscow"),
    ("What is the capital of China?", "Beijing"),
    ("What is the capital of Egypt?", "Cairo"),
    ("What is the capital of Greece?", "Athens"),
    ("What is the capital of Canada?", "Ottawa"),
    ("What is the capital of Australia?", "Canberra"),
    ("What is the capital of India?", "New Delhi|Delhi"),
    ("What is the capital of Ireland?", "Dublin"),
    ("What is the capital of Austria?", "Vienna"),
    ("What is the capital of Norway?", "Oslo"),
    ("What is the capital of Sweden?", "Stockholm"),
    ("What is the capital of Kenya?", "Nairobi"),
    ("What is the capital of Mexico?", "Mexico City"),
    ("What is the capital of Thailand?", "Bangkok"),
    ("What is the capital of South Korea?", "Seoul"),
    ("What is the capital of Poland?", "Warsaw"),
    ("What is the capital of the Netherlands?", "Amsterdam"),
    ("What is the capital of Belgium?", "Brussels"),
    ("What is the capital of Iran?", "Tehran"),
    ("What is the capital of Peru?", "Lima"),
    ("What is the capital of Cuba?", "Havana"),
    ("What is the capital of the Philippines?", "Manila"),
    ("What is the capital of Indonesia?", "Jakarta"),
    ("What is the capital of Hungary?", "Budapest"),
    ("What is the capital of the Czech Republic?", "Prague"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is the chemical formula of water?", "H2O|H₂O"),
    ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide|CO2|CO₂"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("Who wrote Hamlet?", "Shakespeare"),
    ("Who painted the Mona Lisa?", "Leonardo|da Vinci"),
    ("What is the largest ocean on Earth?", "Pacific"),
    ("How many days are there in a week?", "seven|7"),
    ("How many legs does a dog have?", "four|4"),
    ("How many sides does a triangle have?", "three|3"),
    ("What is the boiling point of water in degrees Celsius?", "100"),
    ("What language is mainly spoken in Brazil?", "Portuguese"),
    ("What is the currency of Japan?", "yen"),
    ("Which organ pumps blood through the human body?", "heart"),
    ("What is the main language spoken in Mexico?", "Spanish"),
    ("What is the longest river in Africa?", "Nile"),
    ("Who was the first person to walk on the Moon?", "Armstrong"),
    ("Who invented the telephone?", "Bell"),
    ("What is the largest mammal?", "blue whale"),
    ("On which planet do we live?", "Earth"),
    ("What is the largest desert in Africa?", "Sahara"),
    ("What is the primary language of the United Kingdom?", "English"),
    ("Who developed the theory of relativity?", "Einstein"),
]
# Countries whose facts stay out of training so the probe above remains held out.
KNOWLEDGE_COUNTRIES = {
    "FR", "JP", "IT", "ES", "DE", "GB", "RU", "CN", "EG", "GR", "CA", "AU", "IN", "PT", "IE", "AT", "NO", "SE",
    "KE", "AR", "MX", "TH", "KR", "US", "BR", "PL", "NL", "BE", "DK", "FI", "TR", "IR", "PE", "CU", "VN", "PH",
    "ID", "HU", "CZ",
}
# Every country whose facts stay out of training: the standard probe's and the large one's.
EXCLUDED_COUNTRIES = KNOWLEDGE_COUNTRIES | LARGE_COUNTRIES

CHAT_TOPICS = [
    "drinking water", "sleep", "exercise", "reading books", "learning a language", "cooking rice", "gardening",
    "recycling", "saving money", "riding a bicycle", "bread", "coffee", "tea", "the ocean", "mountains", "rain",
    "snow", "the moon", "stars", "volcanoes", "dolphins", "elephants", "cats", "dogs", "birds", "butterflies",
    "trees", "flowers", "the internet", "email", "smartphones", "music", "painting", "photography", "chess",
    "football", "swimming", "running", "hiking", "camping", "friendship", "kindness", "patience", "teamwork",
    "time management", "public speaking", "writing a letter", "job interviews", "taking notes", "libraries",
    "museums", "trains", "airplanes", "electric cars", "solar energy", "wind power", "the weather", "clouds",
    "rainbows", "honey", "chocolate", "apples", "vegetables", "breakfast", "vitamins", "washing hands",
    "brushing teeth", "first aid", "birthdays", "holidays", "maps", "clocks", "calendars", "umbrellas",
    "bridges", "lighthouses", "deserts", "forests", "rivers", "islands", "earthquakes", "thunderstorms",
    "the human heart", "the brain", "bones", "muscles", "insects", "fish", "penguins", "owls", "bees",
    "recycling paper", "a healthy diet", "planting a tree", "making friends", "learning to code", "keyboards",
]
# Short factual questions for the replay (none is a probe question or about a probe country).
FACT_PROMPTS = [
    "Who wrote Pride and Prejudice?", "Who wrote War and Peace?", "Who wrote Don Quixote?", "Who wrote Moby-Dick?",
    "Who wrote Oliver Twist?", "Who wrote Frankenstein?", "Who wrote The Odyssey?", "Who wrote The Little Prince?",
    "Who painted The Starry Night?", "Who composed the Moonlight Sonata?", "Who discovered penicillin?",
    "Who invented the light bulb?", "Who discovered gravity?", "Who was Albert Schweitzer?",
    "Which planet is closest to the Sun?", "Which planet has the most famous rings?", "What is the hottest planet?",
    "What is the Moon made of?", "How many legs does an insect have?", "How many legs does a horse have?",
    "How many wings does a bird have?", "How many arms does an octopus have?", "What color is snow?",
    "What color is the sky on a clear day?", "What color is coal?", "What color are strawberries?",
    "Which organ do we use to breathe?", "Which organ do we think with?", "What do cows eat?", "What do pandas eat?",
    "What is the largest continent?", "What is the smallest continent?", "What is the tallest mountain in the world?",
    "What is the longest river in South America?", "How many hours are in a day?", "How many months are in a year?",
    "How many minutes are in an hour?", "What is the chemical symbol for gold?", "What is the chemical symbol for oxygen?",
    "What gas do we need to breathe?", "What is the opposite of cold?", "What is the plural of mouse?",
    "What is a baby cat called?", "What is a baby dog called?", "What do you call a person who flies a plane?",
    "What do you call a doctor for animals?", "Which season comes after winter?", "What is the freezing point of water in Fahrenheit?",
    "What is the largest bird?", "Which animal has a long trunk?", "Which animal is known for its black and white stripes?",
    "What is the main ingredient of bread?", "What fruit is used to make wine?", "What do plants need to grow?",
    "How many players are on a football team?", "What instrument has 88 keys?", "What is the square shape with four equal sides called?",
    "Which metal is liquid at room temperature?", "What is the biggest organ of the human body?", "What is the largest country by area?",
]
CHAT_TEMPLATES = [
    "Give me one practical tip about {t}.", "Describe {t} in two sentences.", "Why is {t} important?",
    "Tell me an interesting fact about {t}.", "Write one friendly sentence about {t}.",
    "Explain {t} to a child in simple words.", "What are two benefits of {t}?",
    "What should a beginner know about {t}?", "Share a short piece of advice about {t}.",
    "What is a common mistake people make with {t}?",
]
COUNTRY_TEMPLATES = ["What is the capital of {c}?", "What language is spoken in {c}?", "Where is {c} located?",
                     "Tell me one fact about {c}.", "What is {c} known for?"]
CODE_TEMPLATES = ["What is the country code of {country} in ISO 3166?", "Give the two-letter ISO 3166 code for {country}."]
MODULE_TEMPLATES = ["What is the Python standard library module `{m}` for?", "In one sentence, what does Python's `{m}` module provide?"]


def _tz_dir() -> Path:
    spec = importlib.util.find_spec("tzdata")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the general-domain data needs the tzdata package (pip install tzdata)")
    return Path(list(spec.submodule_search_locations)[0]) / "zoneinfo"


def country_names() -> dict[str, str]:
    """ISO code -> country name from tzdata's iso3166.tab, without the probes' countries."""
    names = {}
    for line in (_tz_dir() / "iso3166.tab").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            code, name = line.split("\t")[:2]
            if code not in EXCLUDED_COUNTRIES and name.isascii():
                names[code] = name.split(" (")[0].replace("&", "and")
    return names


def stdlib_summaries() -> list[tuple[str, str]]:
    """(module, first docstring line) for stdlib modules with a clean one-sentence summary."""
    out = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_"):
            continue
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        origin = getattr(spec, "origin", None)
        if not origin or not origin.endswith(".py"):
            continue
        try:
            doc = ast.get_docstring(ast.parse(Path(origin).read_text(encoding="utf-8")))
        except (OSError, SyntaxError, UnicodeDecodeError):
            continue
        first = (doc or "").strip().split("\n")[0].strip()
        if 15 <= len(first) <= 120 and first.endswith(".") and first[0].isupper() and name not in first[:len(name) + 1]:
            out.append((name, first))
    return out


def fact_examples(n_codes: int, n_modules: int, seed: int) -> list[Example]:
    """ISO 3166 country codes (general) and stdlib module summaries (code), answers from the files.

    City/country/hemisphere facts were tried and dropped: their terse "X is in Y." answers
    leaked into unrelated questions ("What is the capital of Kenya?" -> "Kenya is in Kenya.").
    """
    rng = random.Random(f"general-facts-{seed}")
    countries = sorted(country_names().items())
    out = []
    for _ in range(n_codes):
        code, name = rng.choice(countries)
        q = rng.choice(CODE_TEMPLATES).format(country=name)
        out.append(_example(q, f"The two-letter ISO 3166 code of {name} is {code}.", "general"))
    modules = stdlib_summaries()
    for _ in range(n_modules if modules else 0):
        m, summary = rng.choice(modules)
        q = rng.choice(MODULE_TEMPLATES).format(m=m)
        out.append(_example(q, f"The `{m}` module: {summary[0].lower() + summary[1:]}", "code"))
    return out


def _topic_words(topic: str) -> tuple[str, str]:
    """A replay topic's last word and its singular ("butterflies" -> "butterfly", "chess" stays)."""
    last = topic.split()[-1].lower()
    if last.endswith("ies"):
        return last, last[:-3] + "y"
    if last.endswith("s") and not last.endswith("ss"):
        return last, last[:-1]
    return last, last


def probed_topics() -> set[str]:
    """CHAT_TOPICS that a fact of the large knowledge probe (the standard one included) names,
    in its question or its answers: the replay stays off the probe's subjects."""
    text = " ".join(f"{q} {a}" for q, a in KNOWLEDGE + KNOWLEDGE_LARGE)
    found = set()
    for topic in CHAT_TOPICS:
        words = "|".join(re.escape(w) for w in _topic_words(topic))
        if re.search(rf"(?<!\w)(?:{words})(?:s|es)?(?!\w)", text, re.IGNORECASE):
            found.add(topic)
    return found


def chat_prompts(n: int, seed: int) -> list[str]:
    """Distinct prompts for the self-distilled replay: short factual questions, everyday topics
    and countries (tzdata names).

    Asking the base about countries (capitals, languages) and training on its own answers keeps
    that behaviour in place; the probes' countries and the topics they name are excluded so the
    probes stay held out.
    """
    rng = random.Random(f"general-chat-{seed}")
    skip = probed_topics()
    pool = [t.format(t=topic) for topic in CHAT_TOPICS if topic not in skip for t in CHAT_TEMPLATES]
    pool += [t.format(c=name) for name in country_names().values() for t in COUNTRY_TEMPLATES]
    pool = sorted(set(pool) - set(FACT_PROMPTS))
    rng.shuffle(pool)
    return FACT_PROMPTS + pool[: max(0, n - len(FACT_PROMPTS))]


def _example(question: str, answer: str, domain: str) -> Example:
    return Example(({"role": "user", "content": question}, {"role": "assistant", "content": answer}), domain)


def heldout_items() -> list[EvalItem]:
    return [EvalItem("knowledge", "general", q, a, "contains", 48) for q, a in KNOWLEDGE]


def large_heldout_items() -> list[EvalItem]:
    """The large set's knowledge suite: the standard probe, then the large probe's facts."""
    return heldout_items() + [EvalItem("knowledge", "general", q, a, "contains", 48) for q, a in KNOWLEDGE_LARGE]

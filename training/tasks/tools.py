"""Tool-use domain: synthetic function calling in the server's own tool format.

Each example offers a few tools (JSON schemas in the system message, rendered by
``pesc_serve.server.tools`` exactly as the server renders a request with ``tools``) and then:

* ``call``: the question needs one of them; the reply calls it with arguments copied or
  derived from the question (``{"tool_calls": [...]}``);
* ``no_fit``: no offered tool fits (an arithmetic or general question); the reply answers in
  text (``{"response": ...}``);
* ``result``: a call was made and the tool answered; the reply uses the result.

The held-out items use other tools, other argument names, other phrasings and other values,
so a score on them measures picking and filling tools, not recall of the training ones.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, Callable

from pesc_serve.server.protocol import ChatMessage
from pesc_serve.server.tools import Tool, ToolPlan, parse_reply, render_messages
from training.data import Example
from training.tasks.items import EvalItem

Args = dict[str, Any]


@dataclass(frozen=True)
class ToolTask:
    """A tool, how people ask for it, and what it answers.

    ``ask(rng)`` -> (question, arguments); ``result(rng, args)`` -> (tool output, the reply
    that uses it, the part of the output a good reply must repeat).  ``tool`` is the tool under
    its canonical name and argument names (those ``ask`` uses); a training tool may list other
    names and argument names (``aliases``), drawn per example, so the model learns to read the
    schema instead of recalling one spelling.
    """

    tool: Tool
    ask: Callable[[random.Random], tuple[str, Args]]
    result: Callable[[random.Random, Args], tuple[str, str, str]]
    key: str  # the argument a call must get right
    aliases: tuple[tuple[str, ...], dict[str, tuple[str, ...]]] = ((), {})
    weight: float = 1.0  # relative share of the call examples: the action-extraction kinds get more

    def names(self) -> set[str]:
        """Every name this tool goes by."""
        return {self.tool.name, *self.aliases[0]}

    def argument_names(self) -> set[str]:
        """Every name any of its arguments goes by."""
        return set(self.tool.parameters["properties"]) | {a for alts in self.aliases[1].values() for a in alts}

    def variant(self, rng: random.Random) -> tuple[Tool, dict[str, str]]:
        """The tool under one of its names, and the renaming of its canonical arguments."""
        names, args = self.aliases
        if not names and not args:
            return self.tool, {k: k for k in self.tool.parameters["properties"]}
        name = rng.choice((self.tool.name, *names))
        rename = {k: rng.choice((k, *args.get(k, ()))) for k in self.tool.parameters["properties"]}
        props = {rename[k]: v for k, v in self.tool.parameters["properties"].items()}
        return Tool(name, self.tool.description, {**self.tool.parameters, "properties": props,
                                                  "required": [rename[k] for k in self.tool.parameters["required"]]}), rename


def _tool(name: str, description: str, **params: str) -> Tool:
    types = {k: v.split(":")[0] for k, v in params.items()}
    props = {k: {"type": t} for k, t in types.items()}
    return Tool(name, description, {"type": "object", "properties": props, "required": list(props)})


def _pick(rng: random.Random, phrasings: list[str], **values: Any) -> str:
    return rng.choice(phrasings).format(**values)


TRAIN_CITIES = ["Paris", "Madrid", "Lisbon", "Vienna", "Prague", "Chicago", "Toronto", "Seoul", "Lima", "Nairobi",
                "Boston", "Denver", "Munich", "Milan", "Dublin", "Oslo", "Helsinki", "Warsaw", "Zurich", "Sydney"]
HELDOUT_CITIES = ["Bogota", "Hanoi", "Kyoto", "Porto", "Seville", "Krakow", "Geneva", "Austin", "Quebec", "Perth",
                  "Valencia", "Bergen", "Tallinn", "Riga", "Cusco", "Goa"]
CURRENCIES = ["USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "SEK"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowy"]
WORDS = ["serendipity", "ephemeral", "ubiquitous", "laconic", "quixotic", "mellifluous", "sanguine", "pragmatic"]
LANGUAGES = ["French", "German", "Spanish", "Italian", "Japanese", "Portuguese"]
PHRASES = ["good morning", "thank you very much", "where is the station", "see you tomorrow", "I am hungry"]
TOPICS = ["football", "space exploration", "electric cars", "the stock market", "climate", "chess"]
SONGS = ["Blue Moon", "Yesterday", "Bohemian Rhapsody", "Imagine", "Hallelujah", "Clair de Lune"]
TICKERS = ["AAPL", "MSFT", "TSLA", "AMZN", "NVDA", "IBM", "INTC", "ORCL"]
NAMES = ["alice@example.com", "bob@example.com", "carol@example.org", "dan@example.net"]
SUBJECTS = ["meeting notes", "lunch on Friday", "project update", "holiday plans"]
ZONES = ["Europe/Paris", "Asia/Tokyo", "America/New_York", "Australia/Sydney", "Africa/Cairo"]
# Chores, texts with typos, genres and countries of the training tools; none of them is a
# held-out value (and no country is in the knowledge probe).
CHORES = ["pay the rent", "renew my passport", "walk the dog", "clean the kitchen", "pick up the kids",
          "return the library books", "fix the bike", "email the landlord", "pay the phone bill", "bake a cake"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TYPO_TEXTS = ["Teh cat sat on teh mat", "I definately agree with you", "We will meat at noon",
              "She recieved a pakage", "The wether is nice todya", "Lets go to the libary",
              "He has alot of freinds", "My computor is to slow"]
# Sentences that training tools take verbatim, typos included (typos are drawn per example):
# a call copies the user's text as it is and never corrects it.
PLAIN_TEXTS = ["The meeting starts after lunch", "My sister bought a new bicycle", "We should water the garden",
               "The train was late again today", "Please bring your laptop tomorrow", "He forgot his keys at home",
               "They are going to the beach", "Your order will arrive soon", "There is a bakery near the station",
               "I would like two cups of tea", "The weather is nice this morning", "She wrote a letter to her friend",
               "We need more paper for the printer", "The children played in the park", "Our team won the final game",
               "It is too cold to swim", "Their dog barks at night", "The library opens at nine",
               "I think you are right about that", "The museum was closed on Monday",
               "We are going to the market", "They would like to write a book", "Their friends are going to the zoo",
               "I hope your trip to the coast is fun", "There are two cats in the garden"]
HOMOPHONES = {"there": "their", "their": "there", "they": "thay", "your": "you're", "to": "too", "too": "to",
              "is": "iz", "are": "our", "would": "wood", "write": "right", "wrote": "rote", "two": "too"}


def typo_text(rng: random.Random) -> str:
    """One of PLAIN_TEXTS with one or two typos: a swapped, dropped or doubled letter, or a homophone."""
    words = rng.choice(PLAIN_TEXTS).split()
    editable = [i for i, w in enumerate(words) if len(w) >= 4 or w.lower() in HOMOPHONES]
    for i in rng.sample(editable, min(len(editable), rng.randint(1, 2))):
        w = words[i]
        if w.lower() in HOMOPHONES and rng.random() < 0.5:
            swap = HOMOPHONES[w.lower()]
            words[i] = swap.capitalize() if w[0].isupper() else swap
        elif len(w) >= 4:
            j = rng.randint(1, len(w) - 3)
            words[i] = rng.choice([w[:j] + w[j + 1] + w[j] + w[j + 2:], w[:j] + w[j + 1:], w[:j] + w[j] + w[j:]])
    return " ".join(words)


SNIPPETS = ["gracias por todo", "merci beaucoup", "danke schoen", "grazie mille", "obrigado amigo", "tack så mycket"]
GENRES = ["jazz", "rock", "classical", "hip hop", "folk", "opera"]
NATIONS = ["Argentina", "Morocco", "Finland", "Denmark", "Malaysia", "Nigeria", "Colombia", "Ukraine", "Romania",
           "Iceland"]
ALARM_LABELS = ["go running", "catch the early train", "feed the cat", "take my medicine", "study for the exam",
                "call the office", "walk to work", "make breakfast"]
CONTACTS = ["Anna", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hugo"]
ROOMS = ["living room", "bedroom", "kitchen", "office"]
SPORTS = ["yoga", "pilates", "spinning", "boxing", "swimming", "climbing", "zumba", "rowing"]
# What a nudge asks the user to do: the call takes this bare action, never the request around it
# ("I need a nudge to ...") nor its time.
NUDGE_ACTIONS = ["stretch my legs", "check the oven", "take out the trash", "send the invoice", "charge my phone",
                 "lock the back door", "move the car", "drink some water", "pack my gym bag", "print the tickets"]
# What a memo pops up to say: again the bare action, never "I need a memo to" nor the hour.
MEMO_ACTIONS = ["feed the fish", "buy stamps", "check the mail", "book a haircut", "pay the plumber",
                "defrost the freezer", "ring the bank", "collect the laundry", "back up my laptop", "refill the printer"]
SHOP_ITEMS = ["running shoes", "a bicycle", "fresh bread", "a phone charger", "vinyl records", "flowers", "a winter coat",
              "board games"]
ART_KINDS = ["modern", "classical", "Impressionist", "Japanese", "folk", "Renaissance"]


def _train_tasks() -> list[ToolTask]:
    def weather(rng):
        city = rng.choice(TRAIN_CITIES)
        return _pick(rng, ["What's the weather like in {c}?", "Is it raining in {c} right now?",
                           "Tell me the current weather for {c}.", "How warm is it in {c} today?"], c=city), {"city": city}

    def weather_result(rng, a):
        t, cond = rng.randint(-5, 35), rng.choice(CONDITIONS)
        return f"{t} C, {cond}", f"It is {t} C and {cond} in {a['city']} right now.", f"{t} C"

    def money(rng):
        amount, f, t = rng.choice([5, 10, 20, 50, 75, 100, 250, 1000]), *rng.sample(CURRENCIES, 2)
        return _pick(rng, ["How much is {a} {f} in {t}?", "Convert {a} {f} to {t}.",
                           "What are {a} {f} worth in {t}?", "If I swap {a} {f} for {t}, how much do I get?",
                           "{a} {f} equals how many {t}?"], a=amount, f=f, t=t), \
            {"amount": amount, "from_currency": f, "to_currency": t}

    def money_result(rng, a):
        v = round(a["amount"] * rng.uniform(0.5, 1.6), 2)
        return f"{v} {a['to_currency']}", f"{a['amount']} {a['from_currency']} is about {v} {a['to_currency']}.", str(v)

    def stock(rng):
        t = rng.choice(TICKERS)
        return _pick(rng, ["What is {t} trading at?", "Give me the latest share price of {t}.",
                           "How much does one {t} share cost now?"], t=t), {"ticker": t}

    def stock_result(rng, a):
        p = round(rng.uniform(20, 900), 2)
        return f"{p} USD", f"{a['ticker']} is trading at {p} USD.", str(p)

    def translate(rng):
        text, lang = rng.choice(PHRASES), rng.choice(LANGUAGES)
        return _pick(rng, ["Translate '{x}' into {l}.", "How do you say '{x}' in {l}?"], x=text, l=lang), \
            {"text": text, "target_language": lang}

    def translate_result(rng, a):
        out = f"[{a['target_language']}] {a['text']}"
        return out, f"In {a['target_language']}: {out}", out

    def timer(rng):
        n = rng.choice([1, 2, 3, 5, 10, 15, 20, 25, 30, 45, 60, 90])
        return _pick(rng, ["Set a timer for {n} minutes.", "Start a {n} minute timer, please.",
                           "Can you time {n} minutes for me?"], n=n), {"minutes": n}

    def timer_result(rng, a):
        return f"timer set: {a['minutes']} min", f"Your {a['minutes']} minute timer is running.", str(a["minutes"])

    def email(rng):
        to, subject = rng.choice(NAMES), rng.choice(SUBJECTS)
        return _pick(rng, ["Email {to} with the subject '{s}'.", "Send a mail to {to} about {s}."], to=to, s=subject), \
            {"to": to, "subject": subject}

    def email_result(rng, a):
        return "sent", f"Done: the email about {a['subject']} was sent to {a['to']}.", a["to"]

    def flights(rng):
        a, b = rng.sample(TRAIN_CITIES, 2)
        return _pick(rng, ["Find flights from {a} to {b}.", "Are there flights between {a} and {b}?",
                           "I need to fly from {a} to {b}.",
                           "Show me plane tickets to {b}, leaving from {a}.", "I want to reach {b} by air; I start in {a}."],
                     a=a, b=b), {"origin": a, "destination": b}

    def flights_result(rng, a):
        n, price = rng.randint(1, 9), rng.randint(60, 900)
        return f"{n} flights, cheapest {price} EUR", \
            f"I found {n} flights from {a['origin']} to {a['destination']}; the cheapest is {price} EUR.", f"{price} EUR"

    def clock(rng):
        z = rng.choice(ZONES)
        return _pick(rng, ["What time is it in the {z} time zone?", "Tell me the local time for {z}."], z=z), \
            {"timezone": z}

    def clock_result(rng, a):
        t = f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}"
        return t, f"It is {t} in {a['timezone']}.", t

    def tip(rng):
        bill, pct = rng.choice([20, 35, 48, 60, 85, 120]), rng.choice([10, 15, 18, 20])
        return _pick(rng, ["What tip should I leave on a {b} dollar bill at {p} percent?",
                           "Work out a {p}% tip for a bill of {b} dollars."], b=bill, p=pct), {"bill": bill, "percent": pct}

    def tip_result(rng, a):
        v = round(a["bill"] * a["percent"] / 100, 2)
        return f"{v}", f"A {a['percent']}% tip on {a['bill']} dollars is {v} dollars.", str(v)

    def define(rng):
        w = rng.choice(WORDS)
        return _pick(rng, ["What does the word '{w}' mean?", "Define {w}."], w=w), {"word": w}

    def define_result(rng, a):
        return "a word of Latin origin", f"'{a['word']}' is a word of Latin origin.", "Latin"

    def music(rng):
        s = rng.choice(SONGS)
        return _pick(rng, ["Play '{s}'.", "Put on the song {s}, please.", "I'd love to hear the tune {s}."], s=s), {"song": s}

    def music_result(rng, a):
        return "playing", f"Now playing {a['song']}.", a["song"]

    def news(rng):
        t = rng.choice(TOPICS)
        return _pick(rng, ["Show me the latest news about {t}.", "Any headlines on {t} today?"], t=t), {"topic": t}

    def news_result(rng, a):
        n = rng.randint(2, 12)
        return f"{n} new articles", f"There are {n} new articles about {a['topic']}.", str(n)

    def todo(rng):
        task, day = rng.choice(CHORES), rng.choice(WEEKDAYS)
        return _pick(rng, ["Add '{t}' to my to-do list for {d}.", "Put {t} on my list for {d}.",
                           "I have to {t} on {d}, please note it.", "On {d} I must {t}; add it to my tasks."],
                     t=task, d=day), {"task": task, "weekday": day}

    def todo_result(rng, a):
        n = rng.randint(2, 9)
        return f"added, {n} tasks on {a['weekday']}", f"I added '{a['task']}' for {a['weekday']}; you now have {n} tasks " \
            f"on {a['weekday']}.", f"{n} tasks"

    def call(rng):
        who, h = rng.choice(CONTACTS), rng.randint(7, 21)
        return _pick(rng, ["Schedule a call with {w} at {h} o'clock.", "At {h}:00 I want to call {w}; put it in my "
                           "calendar.", "Book a phone call with {w} for {h}:00.",
                           "I must phone {w} at {h} o'clock; put it in my calendar."], w=who, h=h), \
            {"contact": who, "start_hour": h}

    def call_result(rng, a):
        return "scheduled", f"Your call with {a['contact']} is booked for {a['start_hour']}:00.", f"{a['start_hour']}:00"

    def words(rng):
        text = rng.choice(TYPO_TEXTS) if rng.random() < 0.3 else typo_text(rng)
        return _pick(rng, ["How many words are in '{x}'?", "Count the words of this text: {x}",
                           "Give me the word count of \"{x}\"."], x=text), {"text": text}

    def words_result(rng, a):
        n = len(a["text"].split())
        return f"{n} words", f"That text has {n} words.", f"{n} words"

    def language(rng):
        text = rng.choice(SNIPPETS) if rng.random() < 0.5 else typo_text(rng)
        return _pick(rng, ["Which language is '{x}' written in?", "Detect the language of: {x}"], x=text), \
            {"text": text}

    def language_result(rng, a):
        lang = rng.choice(LANGUAGES + ["English"])
        return f"language: {lang}", f"That text is in {lang}.", lang

    def gdp(rng):
        c = rng.choice(NATIONS)
        return _pick(rng, ["What is the GDP of {c}?", "How big is the economy of {c}?",
                           "Look up the gross domestic product of {c}."], c=c), {"nation": c}

    def gdp_result(rng, a):
        n = rng.randint(20, 900)
        return f"{n} billion USD", f"The GDP of {a['nation']} is about {n} billion USD.", f"{n} billion"

    def order(rng):
        ref = f"{rng.choice(['AB', 'QK', 'MN', 'TR'])}-{rng.randint(10000, 99999)}"
        return _pick(rng, ["Where is my order {r}?", "What's the status of order {r}?", "Has order {r} shipped yet?"],
                     r=ref), {"order_id": ref}

    def order_result(rng, a):
        city = rng.choice(TRAIN_CITIES)
        return f"shipped, now in {city}", f"Order {a['order_id']} has shipped and is now in {city}.", city

    def flight_status(rng):
        code = f"{rng.choice(['LH', 'BA', 'AF', 'KL', 'IB'])}{rng.randint(100, 9999)}"
        return _pick(rng, ["Is flight {f} on time?", "What's the status of flight {f}?"], f=code), {"flight_number": code}

    def flight_status_result(rng, a):
        m = rng.randint(5, 90)
        return f"delayed by {m} min", f"Flight {a['flight_number']} is delayed by {m} minutes.", f"{m} min"

    def hotel(rng):
        city, n = rng.choice(TRAIN_CITIES), rng.randint(1, 6)
        return _pick(rng, ["Find a hotel in {c} for {n} nights.", "I need a room in {c} for {n} nights.",
                           "Where can I sleep in {c}? I stay {n} nights.",
                           "Book me somewhere to stay in {c}, {n} nights."], c=city, n=n), {"city": city, "nights": n}

    def hotel_result(rng, a):
        name = rng.choice(["Hotel Astoria", "Park Inn", "Grand Central", "Sea View"])
        return f"{name}, {rng.randint(60, 300)} EUR per night", f"{name} in {a['city']} has a room for " \
            f"{a['nights']} nights.", name

    def concerts(rng):
        genre, city = rng.choice(GENRES), rng.choice(TRAIN_CITIES)
        return _pick(rng, ["Are there any {g} concerts in {c}?", "Find {g} gigs in {c} this week.",
                           "I want to hear some {g} music live in {c}."], g=genre, c=city), {"genre": genre, "city": city}

    def concerts_result(rng, a):
        n = rng.randint(1, 8)
        return f"{n} events", f"There are {n} {a['genre']} events in {a['city']} this week.", f"{n}"

    def directions(rng):
        a, b = rng.sample(TRAIN_CITIES, 2)
        return _pick(rng, ["How do I drive from {a} to {b}?", "Give me directions from {a} to {b}.",
                           "What is the route from {a} to {b} by car?",
                           "I'm in {a}; what's the road to {b}?", "Which way do I go to get to {b} from {a}?"], a=a, b=b), {"start": a, "end": b}

    def directions_result(rng, a):
        h = rng.randint(2, 14)
        return f"{h} hours by road", f"The drive from {a['start']} to {a['end']} takes about {h} hours.", f"{h} hours"

    def thermostat(rng):
        room, deg = rng.choice(ROOMS), rng.randint(16, 25)
        return _pick(rng, ["Set the {r} to {d} degrees.", "Make the {r} {d} degrees warm.",
                           "Heat the {r} to {d} degrees, please."], r=room, d=deg), {"room": room, "degrees": deg}

    def thermostat_result(rng, a):
        return f"{a['room']} set to {a['degrees']} C", f"The {a['room']} is now set to {a['degrees']} C.", \
            f"{a['degrees']} C"

    def post(rng):
        text = typo_text(rng)
        return _pick(rng, ["Post this on my profile: {x}", "Share '{x}' with my followers.",
                           "Publish the status \"{x}\"."], x=text), {"status_text": text}

    def post_result(rng, a):
        n = rng.randint(100, 999)
        return f"posted, id {n}", f"Your post is online with id {n}.", f"id {n}"

    def alarm(rng):
        label, h = rng.choice(ALARM_LABELS), rng.randint(5, 11)
        return _pick(rng, ["Wake me at {h} o'clock to {x}.", "At {h}:00 wake me up so I can {x}.",
                           "I want an alarm for {h}:00 to {x}.",
                           "Wake me up to {x} at {h} o'clock.", "Set an alarm to {x} at {h}:00.",
                           "At {h}:00 I need an alarm so I can {x}."], h=h, x=label), {"label": label, "wake_hour": h}

    def alarm_result(rng, a):
        return "alarm set", f"Your alarm rings at {a['wake_hour']}:00 so you can {a['label']}.", f"{a['wake_hour']}:00"

    def rental(rng):
        a, b = rng.sample(TRAIN_CITIES, 2)
        return _pick(rng, ["Rent me a car in {a} that I drop off in {b}.", "I need a rental car from {a} to {b}.",
                           "Hire a car for me: collect it in {a}, leave it in {b}.",
                           "I'll drive one way to {b}; rent me a car starting in {a}."], a=a, b=b), \
            {"collect_city": a, "return_city": b}

    def rental_result(rng, a):
        p = rng.randint(40, 400)
        return f"{p} EUR", f"A one-way car from {a['collect_city']} to {a['return_city']} costs {p} EUR.", f"{p} EUR"

    def rail(rng):
        a, b = rng.sample(TRAIN_CITIES, 2)
        return _pick(rng, ["Book a train from {a} to {b}.", "I need a ticket to {b}, departing {a} by train.",
                           "Get me on a train going to {b} from {a}.", "Train tickets {a} to {b}, please."],
                     a=a, b=b), {"departure": a, "arrival": b}

    def rail_result(rng, a):
        h = rng.randint(6, 20)
        return f"seat booked, leaves {h}:15", f"Your train from {a['departure']} to {a['arrival']} leaves at {h}:15.", \
            f"{h}:15"

    def text_message(rng):
        who, text = rng.choice(CONTACTS), typo_text(rng)
        return _pick(rng, ["Text {w}: {x}", "Send {w} a message saying '{x}'.", "Message {w} \"{x}\""], w=who, x=text), \
            {"recipient_name": who, "message_text": text}

    def text_message_result(rng, a):
        return "delivered", f"Your message to {a['recipient_name']} was delivered.", "delivered"

    def grammar(rng):
        text = typo_text(rng)
        return _pick(rng, ["Is this grammatical? {x}", "Grade the grammar of \"{x}\".", "Proofread this for me: {x}",
                           "Rate my writing: '{x}'"], x=text), {"passage": text}

    def grammar_result(rng, a):
        n = rng.randint(1, 4)
        return f"grade {n}", f"Your text gets grade {n}.", f"grade {n}"

    def fitness(rng):
        sport, h = rng.choice(SPORTS), rng.randint(6, 20)
        return _pick(rng, ["Book me a {s} class at {h} o'clock.", "Sign me up for {s} at {h}:00.",
                           "I want to do {s} at {h} o'clock; reserve a spot."], s=sport, h=h), \
            {"activity": sport, "class_hour": h}

    def fitness_result(rng, a):
        n = rng.randint(1, 12)
        return f"booked, {n} spots left", f"You are booked for {a['activity']} at {a['class_hour']}:00.", \
            f"{a['class_hour']}:00"

    def nudge(rng):
        action, h = rng.choice(NUDGE_ACTIONS), rng.randint(6, 22)
        return _pick(rng, ["Ping me to {x} at {h} o'clock.", "At {h}:00 I need a nudge to {x}.",
                           "Don't let me forget to {x} at {h}:00.", "Send me a notification at {h} o'clock to {x}.",
                           "I'd like a ping at {h}:00 telling me to {x}.", "Nudge me to {x} at {h}:00, please.",
                           "At {h} o'clock I want a notification to {x}.", "I need a nudge to {x} at {h} o'clock.",
                           "At {h}:00 I'd like a ping to {x}."], x=action, h=h), \
            {"action": action, "notify_hour": h}

    def nudge_result(rng, a):
        return "notification scheduled", f"At {a['notify_hour']}:00 you will get a nudge to {a['action']}.", \
            f"{a['notify_hour']}:00"

    def memo(rng):
        action, h = rng.choice(MEMO_ACTIONS), rng.randint(6, 22)
        return _pick(rng, ["At {h}:00 I need a memo to {x}.", "Memo me to {x} at {h} o'clock.",
                           "I need a memo at {h}:00 to {x}.", "Leave me a memo to {x} for {h} o'clock.",
                           "Could you pin a memo at {h}:00 so I {x}?", "At {h} o'clock I want a memo to {x}."],
                     x=action, h=h), {"memo": action, "memo_hour": h}

    def memo_result(rng, a):
        return "memo pinned", f"At {a['memo_hour']}:00 a memo will say: {a['memo']}.", f"{a['memo_hour']}:00"

    # Questions a small model believes it can answer from memory ("where can I ...", how many
    # live somewhere, how big a country is): with a tool that covers them on offer, the call is the
    # answer, and the no-fit examples keep the contrast (the same kind of question beside tools
    # that do not cover it is answered in text).
    def residents(rng):
        c = rng.choice(TRAIN_CITIES)
        return _pick(rng, ["How many inhabitants does {c} have?", "What is the number of residents of {c}?",
                           "How populous is {c}?", "Count the residents of {c} for me."], c=c), {"city_name": c}

    def residents_result(rng, a):
        n = round(rng.uniform(0.3, 9.9), 1)
        return f"{n} million residents", f"{a['city_name']} has about {n} million residents.", f"{n} million"

    def land_area(rng):
        c = rng.choice(NATIONS)
        return _pick(rng, ["How large is {c} in square kilometres?", "What area does {c} cover?",
                           "How much land does {c} have?", "How big is {c} on the map?"], c=c), {"land": c}

    def land_area_result(rng, a):
        n = rng.randint(20, 2900) * 1000
        return f"{n} km2", f"{a['land']} covers about {n} square kilometres.", str(n)

    def median_age(rng):
        c = rng.choice(NATIONS)
        return _pick(rng, ["What's the median age in {c}?", "How old is the typical person in {c}?",
                           "Is {c} a young or an old country, by median age?"], c=c), {"state": c}

    def median_age_result(rng, a):
        n = rng.randint(17, 48)
        return f"median age {n}", f"The median age in {a['state']} is {n} years.", f"{n} years"

    def shop(rng):
        item, c = rng.choice(SHOP_ITEMS), rng.choice(TRAIN_CITIES)
        return _pick(rng, ["Where can I buy {i} in {c}?", "Which shop in {c} sells {i}?",
                           "I want to buy {i} in {c}; where should I go?", "Is there a store in {c} with {i}?"],
                     i=item, c=c), {"item": item, "town": c}

    def shop_result(rng, a):
        name = rng.choice(["Market Hall", "Corner Store", "City Outlet", "Blue Door Shop"])
        return name, f"{name} in {a['town']} sells {a['item']}.", name

    def museum(rng):
        art, c = rng.choice(ART_KINDS), rng.choice(TRAIN_CITIES)
        return _pick(rng, ["Where can I see {k} art in {c}?", "Is there a museum of {k} art in {c}?",
                           "I'd like to look at {k} paintings in {c}; where?"], k=art, c=c), {"art_style": art, "city": c}

    def misspellings(rng):
        text = typo_text(rng)
        return _pick(rng, ["Are there misspelt words in: {x}", "Which words are spelt wrong here? {x}",
                           "Spot the spelling errors in \"{x}\".", "Find the misspellings: '{x}'"], x=text), \
            {"text_to_check": text}

    def misspellings_result(rng, a):
        n = rng.randint(1, 4)
        return f"{n} misspelt words", f"There are {n} misspelt words in your text.", f"{n} misspelt"

    def museum_result(rng, a):
        name = rng.choice(["the City Gallery", "the Art House", "the National Museum", "the Old Mill Gallery"])
        return name, f"Go to {name} in {a['city']} for {a['art_style']} art.", name

    return [
        ToolTask(_tool("get_weather", "Current weather in a city", city="string"), weather, weather_result, "city",
                 (("current_weather", "weather_now"), {"city": ("town", "place")})),
        ToolTask(_tool("convert_currency", "Convert an amount between currencies", amount="number",
                       from_currency="string", to_currency="string"), money, money_result, "amount",
                 (("currency_converter", "fx_convert"), {"amount": ("sum", "quantity"),
                  "from_currency": ("base_currency", "currency_from"), "to_currency": ("quote_currency", "currency_to")})),
        ToolTask(_tool("get_stock_price", "Latest price of a stock", ticker="string"), stock, stock_result, "ticker",
                 (("stock_quote", "share_price"), {"ticker": ("symbol",)})),
        ToolTask(_tool("translate_text", "Translate text into a language", text="string", target_language="string"),
                 translate, translate_result, "target_language",
                 (("translate", "translator"), {"text": ("phrase", "input_text"), "target_language": ("language", "to_language")})),
        ToolTask(_tool("set_timer", "Start a countdown timer", minutes="integer"), timer, timer_result, "minutes",
                 (("start_timer", "countdown"), {"minutes": ("duration_minutes", "mins")})),
        ToolTask(_tool("send_email", "Send an email", to="string", subject="string"), email, email_result, "to",
                 (("email_send", "compose_email"), {"to": ("recipient", "address"), "subject": ("title", "topic_line")})),
        ToolTask(_tool("search_flights", "Search flights between two cities", origin="string", destination="string"),
                 flights, flights_result, "destination",
                 (("find_flights", "flight_search"), {"origin": ("from_city", "departure_city"),
                                                      "destination": ("to_city", "arrival_city")})),
        ToolTask(_tool("get_time", "Local time in a time zone", timezone="string"), clock, clock_result, "timezone",
                 (("local_time", "world_clock"), {"timezone": ("tz", "zone")})),
        ToolTask(_tool("calculate_tip", "Tip for a restaurant bill", bill="number", percent="integer"), tip,
                 tip_result, "bill", (("tip_calculator",), {"bill": ("total", "bill_amount"), "percent": ("tip_percent", "rate")})),
        ToolTask(_tool("lookup_definition", "Dictionary definition of a word", word="string"), define, define_result,
                 "word", (("define_word", "dictionary"), {"word": ("term", "entry")})),
        ToolTask(_tool("play_music", "Play a song", song="string"), music, music_result, "song",
                 (("play_song", "music_player"), {"song": ("track", "song_title")})),
        ToolTask(_tool("get_news", "Latest news on a topic", topic="string"), news, news_result, "topic",
                 (("news_headlines", "latest_news"), {"topic": ("query", "keyword")})),
        ToolTask(_tool("add_todo", "Add a task to the to-do list", task="string", weekday="string"), todo, todo_result,
                 "task", (("todo_add", "add_task"), {"task": ("item", "todo_text"), "weekday": ("due_day", "day_name")})),
        ToolTask(_tool("schedule_call", "Put a phone call in the calendar at an hour of the day", contact="string",
                       start_hour="integer"), call, call_result, "contact",
                 (("book_call", "plan_call"), {"contact": ("person", "callee"), "start_hour": ("at_hour", "hour_of_day")})),
        ToolTask(_tool("count_words", "Count the words of a text", text="string"), words, words_result, "text",
                 (("word_counter", "text_stats"), {"text": ("passage", "content")})),
        ToolTask(_tool("detect_language", "Which language a text is written in", text="string"), language,
                 language_result, "text", (("identify_language", "language_id"), {"text": ("snippet", "sample")})),
        ToolTask(_tool("get_gdp", "Gross domestic product of a nation", nation="string"), gdp, gdp_result, "nation",
                 (("economy_size", "gdp_lookup"), {"nation": ("state", "country_name")})),
        ToolTask(_tool("order_status", "Status of an online order", order_id="string"), order, order_result, "order_id",
                 (("check_order", "get_order"), {"order_id": ("order_number", "reference")})),
        ToolTask(_tool("flight_status", "Whether a flight is on time", flight_number="string"), flight_status,
                 flight_status_result, "flight_number", (("check_flight",), {"flight_number": ("flight", "code")})),
        ToolTask(_tool("find_hotel", "Find a hotel room in a city", city="string", nights="integer"), hotel,
                 hotel_result, "city", (("book_hotel", "hotel_search"), {"city": ("town", "destination_city"),
                                                                        "nights": ("stay_nights", "num_nights")})),
        ToolTask(_tool("search_events", "Concerts and events of a music genre in a city", genre="string", city="string"),
                 concerts, concerts_result, "genre", (("find_concerts", "event_finder"), {"genre": ("style", "kind"),
                                                                                          "city": ("town", "place")})),
        ToolTask(_tool("get_directions", "Driving route between two places", start="string", end="string"),
                 directions, directions_result, "end", (("route_planner", "directions"),
                                                        {"start": ("from_place", "begin"), "end": ("to_place", "finish")})),
        ToolTask(_tool("post_status", "Publish a status update", status_text="string"), post, post_result,
                 "status_text", (("share_post", "publish_update"), {"status_text": ("post_text", "update")})),
        ToolTask(_tool("set_alarm", "Set a wake-up alarm with a label", label="string", wake_hour="integer"), alarm,
                 alarm_result, "label", (("wake_up_alarm", "alarm_clock"), {"label": ("purpose", "alarm_label"),
                                                                           "wake_hour": ("ring_hour", "alarm_hour")}), 2.0),
        ToolTask(_tool("set_thermostat", "Set the heating of a room", room="string", degrees="integer"), thermostat,
                 thermostat_result, "room", (("heating_control", "set_temperature"), {"room": ("zone_name", "space"),
                                                                                     "degrees": ("celsius", "temp")})),
        ToolTask(_tool("rent_car", "Hire a vehicle for a one-way trip", collect_city="string", return_city="string"),
                 rental, rental_result, "return_city", (("car_rental", "hire_vehicle"),
                                                        {"collect_city": ("start_city", "from_town"),
                                                         "return_city": ("end_city", "to_town")})),
        ToolTask(_tool("rail_booking", "Reserve a seat on the railway between two stations", departure="string",
                       arrival="string"), rail, rail_result, "arrival",
                 (("book_train", "train_ticket"), {"departure": ("leave_from", "station_from"),
                                                   "arrival": ("arrive_at", "station_to")})),
        ToolTask(_tool("send_text", "Send a short text message to a contact", recipient_name="string",
                       message_text="string"), text_message, text_message_result, "message_text",
                 (("sms", "text_contact"), {"recipient_name": ("contact_name", "who"), "message_text": ("body", "sms_text")})),
        ToolTask(_tool("grade_grammar", "Give a grammar grade to a passage", passage="string"), grammar, grammar_result,
                 "passage", (("grammar_grade", "proofread"), {"passage": ("writing", "text_in")})),
        ToolTask(_tool("book_class", "Reserve a place in a sports class at an hour", activity="string",
                       class_hour="integer"), fitness, fitness_result, "activity",
                 (("class_booking", "gym_booking"), {"activity": ("sport", "class_name"), "class_hour": ("hour_slot", "starts_at")})),
        ToolTask(_tool("notify_me", "Send the user a notification at an hour of the day", action="string",
                       notify_hour="integer"), nudge, nudge_result, "action",
                 (("send_nudge", "ping_me"), {"action": ("todo_note", "what_to_do", "note_text"),
                                              "notify_hour": ("ping_hour", "at_time")}), 2.0),
        ToolTask(_tool("pin_memo", "Pin a memo that pops up at an hour of the day", memo="string", memo_hour="integer"),
                 memo, memo_result, "memo", (("add_memo", "memo_at"), {"memo": ("memo_text", "note_body"),
                                                                     "memo_hour": ("pop_hour", "show_at")}), 2.0),
        ToolTask(_tool("city_residents", "Number of people living in a city", city_name="string"), residents,
                 residents_result, "city_name", (("residents_count", "city_size"),
                                                 {"city_name": ("municipality", "urban_area")})),
        ToolTask(_tool("country_area", "Land area of a country in square kilometres", land="string"), land_area,
                 land_area_result, "land", (("land_area", "area_lookup"), {"land": ("nation_name", "territory")})),
        ToolTask(_tool("median_age", "Median age of the people of a country", state="string"), median_age,
                 median_age_result, "state", (("age_statistics", "demographics"), {"state": ("land_name", "realm")})),
        ToolTask(_tool("find_shop", "Shops in a city that sell an item", item="string", town="string"), shop,
                 shop_result, "item", (("shop_finder", "store_search"), {"item": ("product", "goods"),
                                                                         "town": ("shop_city", "in_city")})),
        ToolTask(_tool("mark_misspellings", "List the misspelt words of a text", text_to_check="string"),
                 misspellings, misspellings_result, "text_to_check",
                 (("misspelling_finder", "orthography"), {"text_to_check": ("draft", "words_in")})),
        ToolTask(_tool("find_museum", "Museums showing a style of art in a city", art_style="string", city="string"),
                 museum, museum_result, "art_style", (("museum_search", "gallery_finder"),
                                                      {"art_style": ("style_of_art", "movement"),
                                                       "city": ("museum_city", "located_in")})),
    ]


def _heldout_tasks() -> list[ToolTask]:
    def forecast(rng):
        loc, d = rng.choice(HELDOUT_CITIES), rng.randint(2, 7)
        return _pick(rng, ["Could you give me the {d}-day forecast for {l}?", "What will the weather be in {l} over "
                           "the next {d} days?"], l=loc, d=d), {"location": loc, "days": d}

    def forecast_result(rng, a):
        hi = rng.randint(0, 33)
        return f"highs around {hi} C", f"Over the next {a['days']} days {a['location']} will see highs around {hi} C.", \
            f"{hi} C"

    def exchange(rng):
        v, s, t = rng.choice([15, 30, 40, 200, 500]), *rng.sample(CURRENCIES, 2)
        return _pick(rng, ["I have {v} {s}; what would that be in {t}?", "Change {v} {s} into {t} for me."],
                     v=v, s=s, t=t), {"value": v, "source": s, "target": t}

    def exchange_result(rng, a):
        out = round(a["value"] * rng.uniform(0.5, 1.6), 2)
        return f"{out} {a['target']}", f"That is {out} {a['target']}.", str(out)

    def restaurant(rng):
        cuisine, area = rng.choice(["Thai", "Mexican", "Italian", "Indian", "Greek"]), rng.choice(HELDOUT_CITIES)
        return _pick(rng, ["Find me somewhere to eat {c} food in {a}.", "Where can I eat {c} food in {a}?"], c=cuisine, a=area), \
            {"cuisine": cuisine, "area": area}

    def restaurant_result(rng, a):
        name = rng.choice(["Golden Fork", "Casa Verde", "Blue Lotus", "Olive Tree"])
        return name, f"Try {name}, a {a['cuisine']} place in {a['area']}.", name

    def parcel(rng):
        tn = f"ZX{rng.randint(100000, 999999)}"
        return _pick(rng, ["Where is my parcel {t}?", "Track shipment {t}, please."], t=tn), {"tracking_number": tn}

    def parcel_result(rng, a):
        city = rng.choice(HELDOUT_CITIES)
        return f"in transit, last seen in {city}", f"Parcel {a['tracking_number']} is in transit; it was last seen in {city}.", city

    def taxi(rng):
        a, b = rng.sample(HELDOUT_CITIES, 2)
        return _pick(rng, ["Get me a cab from {a} to {b}.", "Order a taxi that takes me from {a} to {b}."], a=a, b=b), \
            {"pickup": a, "dropoff": b}

    def taxi_result(rng, a):
        m = rng.randint(3, 25)
        return f"driver arrives in {m} min", f"Your taxi to {a['dropoff']} arrives in {m} minutes.", f"{m} min"

    def population(rng):
        c = rng.choice(["Peru", "Vietnam", "Norway", "Kenya", "Chile", "Poland", "Portugal", "Nepal"])
        return _pick(rng, ["How many people live in {c}?", "What's the population of {c}?"], c=c), {"country": c}

    def population_result(rng, a):
        n = rng.randint(3, 99)
        return f"{n} million", f"About {n} million people live in {a['country']}.", f"{n} million"

    def reminder(rng):
        msg, h = rng.choice(["call mom", "water the plants", "buy milk", "book the dentist"]), rng.randint(7, 21)
        return _pick(rng, ["Remind me to {m} at {h} o'clock.", "At {h}:00 I need a reminder to {m}."], m=msg, h=h), \
            {"message": msg, "hour": h}

    def reminder_result(rng, a):
        return "reminder saved", f"I will remind you to {a['message']} at {a['hour']}:00.", f"{a['hour']}:00"

    def spell(rng):
        s = rng.choice(["I recieve the leter tomorow", "Their going too the park", "This sentense has erors"])
        return _pick(rng, ["Check the spelling of: {s}", "Fix the typos in '{s}'."], s=s), {"sentence": s}

    def spell_result(rng, a):
        return "3 mistakes found", "I found 3 mistakes in that sentence.", "3 mistakes"

    return [
        ToolTask(_tool("weather_forecast", "Weather forecast for the coming days", location="string", days="integer"),
                 forecast, forecast_result, "location"),
        ToolTask(_tool("exchange_money", "Exchange money between currencies", value="number", source="string",
                       target="string"), exchange, exchange_result, "value"),
        ToolTask(_tool("find_restaurant", "Find a restaurant by cuisine and area", cuisine="string", area="string"),
                 restaurant, restaurant_result, "cuisine"),
        ToolTask(_tool("track_package", "Where a shipment is", tracking_number="string"), parcel, parcel_result,
                 "tracking_number"),
        ToolTask(_tool("book_taxi", "Order a taxi", pickup="string", dropoff="string"), taxi, taxi_result,
                 "dropoff"),
        ToolTask(_tool("get_population", "Population of a country", country="string"), population, population_result,
                 "country"),
        ToolTask(_tool("create_reminder", "Save a reminder for a time of day", message="string", hour="integer"),
                 reminder, reminder_result, "message"),
        ToolTask(_tool("spell_check", "Find spelling mistakes in a sentence", sentence="string"), spell, spell_result,
                 "sentence"),
    ]


TRAIN_TASKS = _train_tasks()
HELDOUT_TASKS = _heldout_tasks()


def _offered(rng: random.Random, tasks: list[ToolTask], must: ToolTask | None, n: int) -> list[Tool]:
    """``n`` tools under their canonical names, ``must`` among them (the held-out items)."""
    others = [t.tool for t in tasks if t is not must]
    tools = rng.sample(others, n - (must is not None)) + ([must.tool] if must is not None else [])
    rng.shuffle(tools)
    return tools


def _offered_variants(rng: random.Random, must: ToolTask | None, n: int) -> tuple[list[Tool], Tool | None, dict[str, str]]:
    """``n`` training tools, each under a name and argument names drawn for this example, and
    ``must``'s drawn tool and argument renaming."""
    chosen = rng.sample([t for t in TRAIN_TASKS if t is not must], n - (must is not None))
    tools = [t.variant(rng)[0] for t in chosen]
    tool, rename = must.variant(rng) if must is not None else (None, {})
    if tool is not None:
        tools.append(tool)
    rng.shuffle(tools)
    return tools, tool, rename


def call_reply(name: str, args: Args) -> str:
    """The reply that calls ``name``: what the server's grammar produces, character for character."""
    return json.dumps({"tool_calls": [{"name": name, "arguments": args}]}, ensure_ascii=False)


def answer_reply(text: str) -> str:
    return json.dumps({"response": text}, ensure_ascii=False)


def _messages(tools: list[Tool], turns: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Chat turns rendered as the server renders a request with these tools (tool_choice auto)."""
    return render_messages([ChatMessage(**t) for t in turns], ToolPlan(tools, "auto"))


def _result_turns(rng: random.Random, name: str, question: str, args: Args, output: str) -> list[dict[str, Any]]:
    """A question, the call that answers it and the tool's output, as OpenAI chat messages."""
    call_id = f"call_{rng.randrange(16**8):08x}"
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function",
             "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}]},
        {"role": "tool", "tool_call_id": call_id, "content": output},
    ]


def train_examples(calls: int, no_fit: int, results: int, no_fit_pairs: list[tuple[str, str]], seed: int) -> list[Example]:
    """``calls``/``no_fit``/``results`` examples of each kind; ``no_fit_pairs`` are (question,
    answer) pairs from the other domains, answered in text beside unrelated tools."""
    rng = random.Random(f"tools-train-{seed}")
    out: list[Example] = []
    weights = [t.weight for t in TRAIN_TASKS]
    for _ in range(calls):
        task = rng.choices(TRAIN_TASKS, weights)[0]
        question, args = task.ask(rng)
        tools, tool, rename = _offered_variants(rng, task, rng.randint(1, 4))
        msgs = _messages(tools, [{"role": "user", "content": question}])
        named = {rename[k]: v for k, v in args.items()}
        out.append(Example(tuple(msgs) + ({"role": "assistant", "content": call_reply(tool.name, named)},), "tools"))
    for i in range(no_fit):
        question, answer = no_fit_pairs[i % len(no_fit_pairs)]
        tools, _, _ = _offered_variants(rng, None, rng.randint(1, 4))
        msgs = _messages(tools, [{"role": "user", "content": question}])
        out.append(Example(tuple(msgs) + ({"role": "assistant", "content": answer_reply(answer)},), "tools"))
    for _ in range(results):
        task = rng.choice(TRAIN_TASKS)
        question, args = task.ask(rng)
        output, reply, _ = task.result(rng, args)
        tools, tool, rename = _offered_variants(rng, task, rng.randint(1, 4))
        named = {rename[k]: v for k, v in args.items()}
        msgs = _messages(tools, _result_turns(rng, tool.name, question, named, output))
        out.append(Example(tuple(msgs) + ({"role": "assistant", "content": answer_reply(reply)},), "tools"))
    return out


@dataclass(frozen=True)
class ToolEvalItem(EvalItem):
    """A held-out tool item: the request's ``tools`` and ``messages`` (OpenAI bodies) and the
    call (name and key argument) or answer text it expects."""

    tools: tuple = ()
    messages: tuple = ()
    tool_name: str = ""
    key: str = ""
    key_value: Any = None

    def request(self) -> dict[str, Any]:
        return {"messages": list(self.messages), "tools": list(self.tools), "tool_choice": "auto"}

    def to_json(self) -> dict:
        return {**super().to_json(), **self.request(), "tool_name": self.tool_name, "key": self.key,
                "key_value": self.key_value}


def _openai_tools(tools: list[Tool]) -> tuple:
    return tuple({"type": "function", "function": {"name": t.name, "description": t.description,
                                                   "parameters": t.parameters}} for t in tools)


def _call_item(rng: random.Random) -> ToolEvalItem:
    """A held-out request one offered tool fits (one item at a time, so both sets share it)."""
    task = rng.choice(HELDOUT_TASKS)
    question, args = task.ask(rng)
    tools = _openai_tools(_offered(rng, HELDOUT_TASKS, task, rng.randint(2, 3)))
    return ToolEvalItem("tool_call", "tools", question, task.tool.name, "tool", 96, tools=tools,
                        messages=({"role": "user", "content": question},), tool_name=task.tool.name,
                        key=task.key, key_value=args[task.key])


def _no_call_item(rng: random.Random, question: str) -> ToolEvalItem:
    """``question`` beside held-out tools none of which fits it."""
    tools = _openai_tools(_offered(rng, HELDOUT_TASKS, None, rng.randint(2, 3)))
    return ToolEvalItem("tool_no_call", "tools", question, "", "tool", 96, tools=tools,
                        messages=({"role": "user", "content": question},))


def _result_item(rng: random.Random) -> ToolEvalItem:
    """A held-out call already made and answered; the reply must use the answer."""
    task = rng.choice(HELDOUT_TASKS)
    question, args = task.ask(rng)
    output, _, must = task.result(rng, args)
    tools = _openai_tools(_offered(rng, HELDOUT_TASKS, task, rng.randint(2, 3)))
    messages = tuple(_result_turns(rng, task.tool.name, question, args, output))
    return ToolEvalItem("tool_result", "tools", question, must, "tool", 96, tools=tools, messages=messages)


def heldout_items(per_kind: int, no_fit_questions: list[str], seed: int) -> list[ToolEvalItem]:
    """Three suites: ``tool_call`` (the right held-out tool with the right key argument),
    ``tool_no_call`` (no offered tool fits: an answer, no call) and ``tool_result`` (the reply
    uses the tool's output)."""
    rng = random.Random(f"tools-heldout-{seed}")
    items = [_call_item(rng) for _ in range(per_kind)]
    items += [_no_call_item(rng, no_fit_questions[i % len(no_fit_questions)]) for i in range(per_kind)]
    items += [_result_item(rng) for _ in range(per_kind)]
    return items


def _distinct(make: Callable[[], ToolEvalItem], n: int) -> list[ToolEvalItem]:
    """``n`` items of ``make()`` with different questions (a few held-out tools have few)."""
    items: list[ToolEvalItem] = []
    seen: set[str] = set()
    for _ in range(100 * n):
        if len(items) == n:
            break
        item = make()
        if item.prompt not in seen:
            seen.add(item.prompt)
            items.append(item)
    if len(items) < n:
        raise ValueError(f"the held-out tools give only {len(items)} different questions, {n} asked")
    return items


def large_heldout_items(per_kind: int, no_fit_questions: list[str], seed: int) -> list[ToolEvalItem]:
    """The three suites of :func:`heldout_items` for the large set: held-out tools only, no
    question twice in a suite, and ``per_kind`` different no-fit questions drawn from
    ``no_fit_questions`` (the large knowledge probe's)."""
    distinct = sorted(set(no_fit_questions))
    if len(distinct) < per_kind:
        raise ValueError(f"{per_kind} tool_no_call items need as many different questions, got {len(distinct)}")
    rng = random.Random(f"tools-heldout-large-{seed}")
    items = _distinct(lambda: _call_item(rng), per_kind)
    items += [_no_call_item(rng, q) for q in rng.sample(distinct, per_kind)]
    items += _distinct(lambda: _result_item(rng), per_kind)
    return items


def score_tool_reply(item: ToolEvalItem, message: dict[str, Any]) -> bool:
    """``message``: the chat completion's ``message`` (content, tool_calls)."""
    calls = message.get("tool_calls") or []
    if item.suite == "tool_call":
        if len(calls) != 1 or calls[0]["function"]["name"] != item.tool_name:
            return False
        try:
            got = json.loads(calls[0]["function"]["arguments"]).get(item.key)
        except (ValueError, AttributeError):
            return False
        if isinstance(item.key_value, str):
            return isinstance(got, str) and got.strip().lower() == item.key_value.lower()
        return got == item.key_value
    content = message.get("content") or ""
    if item.suite == "tool_no_call":
        return not calls and bool(content.strip())
    return not calls and item.answer.lower() in content.lower()


def _plan(item: ToolEvalItem) -> ToolPlan:
    return ToolPlan([Tool(t["function"]["name"], t["function"].get("description", ""), t["function"]["parameters"])
                     for t in item.tools], "auto")


def rendered_request(item: ToolEvalItem) -> list[dict[str, str]]:
    """The item's messages as the server renders them (offline evaluation)."""
    return _messages(_plan(item).tools, list(item.messages))


def reply_message(item: ToolEvalItem, text: str) -> dict[str, Any]:
    """An unconstrained reply parsed as the server parses one: the response ``message``."""
    reply = parse_reply(text.strip(), _plan(item))
    return {"content": reply.content, "tool_calls": [c.body() for c in reply.tool_calls]}

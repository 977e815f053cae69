"""Writes ``topics.jsonl``: short sentences on four topics, made from templates written for adaptfn.

Each line is ``{"text": ..., "label": ..., "split": "train" | "test"}``. The split is by template: the
held-out sentences come from templates the training set never uses, so held-out accuracy measures more
than remembering sentence shapes. Deterministic (fixed seed); run it to regenerate the file:

    python examples/data/make_topics.py
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

LABELS = ["sports", "food", "weather", "technology"]

# per topic: (template, slot fillers); the last two templates of each topic are held out for testing
TEMPLATES: dict[str, list[tuple[str, dict[str, list[str]]]]] = {
    "sports": [
        ("The {team} {result} the {game} on {day}.",
         {"team": ["home side", "visiting team", "youth squad", "national team"], "result": ["won", "lost", "drew"],
          "game": ["final", "derby", "semi-final"], "day": ["Saturday", "Sunday"]}),
        ("{player} scored {n} goals in the {half} half.",
         {"player": ["The striker", "Our captain", "The young winger", "Their defender"],
          "n": ["two", "three", "four"], "half": ["first", "second"]}),
        ("The coach wants us to practise {skill} before the {event}.",
         {"skill": ["free kicks", "passing drills", "sprints", "penalty shots"],
          "event": ["tournament", "cup match", "league opener"]}),
        ("The referee showed a {card} card to the {position} after {minute} minutes.",
         {"card": ["yellow", "red"], "position": ["goalkeeper", "midfielder", "substitute"],
          "minute": ["ten", "forty", "eighty"]}),
        ("She finished the {distance} in under {time} and set a club record.",
         {"distance": ["marathon", "ten kilometre race", "half marathon", "relay leg"],
          "time": ["three hours", "forty minutes", "ninety minutes"]}),
        ("Fans filled the {venue} to watch the {sport} match.",
         {"venue": ["stadium", "arena", "old ground", "court"],
          "sport": ["rugby", "basketball", "tennis", "hockey"]}),
        ("The {sport} team signed a new {position} for next season.",
         {"sport": ["football", "volleyball", "cricket", "handball"],
          "position": ["goalkeeper", "forward", "bowler", "coach"]}),
        ("He trained at the {place} every {time} to get ready for the {race}.",
         {"place": ["track", "pool", "gym"], "time": ["morning", "evening"],
          "race": ["triathlon", "swimming gala", "cycling race", "sprint final"]}),
    ],
    "food": [
        ("Add {amount} of {ingredient} and stir the {dish} for {minutes} minutes.",
         {"amount": ["a pinch", "a spoonful", "a cup"], "ingredient": ["salt", "sugar", "flour", "butter"],
          "dish": ["soup", "sauce", "batter"], "minutes": ["five", "ten"]}),
        ("This {dish} tastes much better with {topping}.",
         {"dish": ["pasta", "curry", "salad", "pizza", "omelette"],
          "topping": ["fresh basil", "grated cheese", "a squeeze of lemon", "roasted garlic"]}),
        ("The bakery on the corner sells fresh {bread} every {time}.",
         {"bread": ["rolls", "sourdough", "croissants", "rye bread", "bagels"],
          "time": ["morning", "afternoon", "weekend"]}),
        ("We ordered {dish} and {side} for dinner.",
         {"dish": ["grilled fish", "noodles", "a burger", "lamb stew", "tacos"],
          "side": ["chips", "rice", "a green salad", "garlic bread"]}),
        ("Chop the {vegetable} finely before frying it in {fat}.",
         {"vegetable": ["onions", "peppers", "carrots", "mushrooms", "leeks"],
          "fat": ["olive oil", "butter", "sunflower oil"]}),
        ("Grandma's recipe for {dish} needs a lot of {ingredient}.",
         {"dish": ["apple pie", "pancakes", "meatballs", "lentil soup", "fruit cake"],
          "ingredient": ["cinnamon", "eggs", "cream", "pepper"]}),
        ("The restaurant serves {cuisine} food with {side}.",
         {"cuisine": ["Italian", "Thai", "Mexican", "Indian", "Greek"],
          "side": ["warm bread", "steamed rice", "a spicy dip", "pickled vegetables"]}),
        ("I baked {dish} for the party and everyone asked for {more}.",
         {"dish": ["chocolate cookies", "a lemon tart", "banana bread", "cheese scones", "a carrot cake"],
          "more": ["the recipe", "a second slice", "another piece"]}),
    ],
    "weather": [
        ("Heavy {precip} is expected {when} in the {region}.",
         {"precip": ["rain", "snow", "hail"], "when": ["tonight", "tomorrow", "this weekend"],
          "region": ["north", "mountains", "coastal towns"]}),
        ("Temperatures will drop to {n} degrees {when}.",
         {"n": ["minus five", "zero", "three", "seven"], "when": ["overnight", "by Friday", "early tomorrow"]}),
        ("A strong wind from the {direction} knocked down {thing}.",
         {"direction": ["north", "west", "east", "sea"],
          "thing": ["several trees", "our fence", "power lines", "the market tents"]}),
        ("The forecast says it will be {adj} and {adj2} {when}.",
         {"adj": ["cold", "warm", "cloudy", "sunny"], "adj2": ["windy", "humid", "dry"],
          "when": ["all week", "on Monday"]}),
        ("Thick fog covered the {place} until {time}.",
         {"place": ["valley", "harbour", "motorway", "airport"], "time": ["noon", "mid-morning", "late afternoon"]}),
        ("It has not rained in the {region} for {n} weeks.",
         {"region": ["south", "farmland", "city", "islands"], "n": ["two", "three", "six"]}),
        ("Bring an umbrella, {showers} are likely {when}.",
         {"showers": ["showers", "thunderstorms", "drizzle and showers"],
          "when": ["after lunch", "this evening", "on the way home", "all afternoon"]}),
        ("After the storm the sky cleared and the {thing} {verb} {when}.",
         {"thing": ["sun", "rainbow"], "verb": ["came out", "appeared"],
          "when": ["before sunset", "within an hour", "by the afternoon"]}),
    ],
    "technology": [
        ("The new {device} has a faster {component} and more {memory}.",
         {"device": ["phone", "laptop", "tablet"], "component": ["processor", "chip", "graphics card"],
          "memory": ["storage", "memory", "RAM"]}),
        ("Please install the {software} update before {when}.",
         {"software": ["security", "operating system", "browser", "firmware"],
          "when": ["Friday", "the next reboot", "tonight"]}),
        ("The {app} crashes whenever I open {thing}.",
         {"app": ["photo app", "email client", "music player", "text editor"],
          "thing": ["a large file", "the settings menu", "two windows"]}),
        ("Our team deployed the {service} to the cloud {when}.",
         {"service": ["web server", "database", "login service", "search backend"],
          "when": ["yesterday", "last night", "this morning"]}),
        ("This laptop's battery lasts {n} hours with the screen {state}.",
         {"n": ["six", "ten", "twelve", "fifteen"], "state": ["dimmed", "at full brightness", "on"]}),
        ("The company released a {product} with {feature}.",
         {"product": ["smartwatch", "wireless headset", "home router", "graphics tablet"],
          "feature": ["a longer battery life", "voice control", "faster charging", "better encryption"]}),
        ("I restarted the {device} and the {network} works again.",
         {"device": ["router", "modem", "laptop"],
          "network": ["wifi", "internet connection", "home network", "video call"]}),
        ("The programmer fixed a bug in the {module} code and pushed it to {place}.",
         {"module": ["payment", "login", "network", "database"],
          "place": ["the main branch", "the repository", "production"]}),
    ],
}
HELD_OUT = 2  # templates per topic kept for the test split
PER_TEMPLATE = 12


def sentences(template: str, slots: dict[str, list[str]], rng: random.Random) -> list[str]:
    names = list(slots)
    combos = list(itertools.product(*(slots[n] for n in names)))
    rng.shuffle(combos)
    out = []
    for combo in combos[:PER_TEMPLATE]:
        s = template.format(**dict(zip(names, combo)))
        out.append(s[0].upper() + s[1:])
    return out


def build() -> list[dict[str, str]]:
    rng = random.Random(0)
    rows = []
    for label in LABELS:
        templates = TEMPLATES[label]
        for i, (template, slots) in enumerate(templates):
            split = "test" if i >= len(templates) - HELD_OUT else "train"
            rows += [{"text": s, "label": label, "split": split} for s in sentences(template, slots, rng)]
    rng.shuffle(rows)
    return rows


if __name__ == "__main__":
    path = Path(__file__).with_name("topics.jsonl")
    rows = build()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    n_test = sum(r["split"] == "test" for r in rows)
    print(f"wrote {path}: {len(rows)} sentences ({len(rows) - n_test} train, {n_test} test)")

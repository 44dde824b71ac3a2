"""What a challenge request looks like: everyday chat bodies, drawn at random.

A host that could tell the hub's challenges from real traffic could behave
only while challenged, so challenges must look like what clients send. Both
senders draw from here: the hand-run ``gpunexus hub challenge`` (hub/, over
a gateway's OpenAI API) and the scheduled ``gpunexus hub challenger`` (node/,
a gateway peer of its own). It lives in verify/ because both hub/ and node/
may import it, and neither may import the other.

A small fixed list of prompts would be a fingerprint (a host that logs
prompts would soon know them all), so a body is composed: a prompt from
several kinds of everyday asks with its blanks filled in, sometimes a system
line, sometimes a short earlier turn, and sampling settings spread as
clients' are (greedy and sampled, short and longer answers).
"""

from __future__ import annotations

import random

TOPICS = (
    "houseplants", "sourdough bread", "a weekend hike", "learning the guitar", "remote work", "a job interview",
    "saving for a holiday", "composting", "running a first 10k", "moving to a new city", "a birthday party",
    "studying for exams", "cycling to work", "a small vegetable garden", "public speaking", "cooking rice",
)
THINGS = (
    "a hash table", "recursion", "a REST API", "DNS", "a linked list", "compound interest", "photosynthesis",
    "a git rebase", "the greenhouse effect", "a mortgage", "inflation", "a binary search", "TCP handshakes",
)
NAMES = ("Sam", "Priya", "Jonas", "Maria", "Wei", "Fatima", "Tom", "Aiko", "Lena", "Omar")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
LANGUAGES = ("French", "Spanish", "German", "Italian", "Portuguese", "Dutch")
PHRASES = ("good morning, how are you?", "where is the train station?", "thank you for your help",
           "see you tomorrow", "the meeting is cancelled")
CODE_ASKS = ("reverse a list in Python", "read a CSV file in Python", "sort a dictionary by value in Python",
             "remove duplicates from a JavaScript array", "format a date in JavaScript", "count words in a string in Go",
             "write a for loop in Rust", "check if a file exists in bash")

TEMPLATES = (
    "Write a short note to {name} about moving our meeting to {day}.",
    "Give me three tips about {topic}.",
    "What should a beginner know about {topic}?",
    "Explain {thing} to a new programmer.",
    "Explain {thing} in two sentences.",
    "How do I {code}?",
    "Show me how to {code}, with a short example.",
    "Translate '{phrase}' into {language}.",
    "Suggest a name for a shop that sells {topic}-related things.",
    "List five things to pack for {topic}.",
    "Give me a haiku about {topic}.",
    "Draft a polite reminder to {name} about an unpaid invoice.",
    "Summarise the plot of a heist film in three sentences.",
    "Write a friendly message to {name} saying thanks for the help on {day}.",
    "What is the difference between {thing} and {other_thing}?",
    "Make a short checklist for {topic}.",
    "I have 20 minutes. Plan something useful around {topic}.",
)
SYSTEM_LINES = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "You are a friendly assistant who explains things simply.",
)
FOLLOW_UPS = ("Can you make it shorter?", "Thanks. One more, please.", "Could you say that more simply?",
              "Now in a more formal tone.", "Great, and a second example?")
MAX_TOKENS = (16, 24, 32, 48, 64)
TEMPERATURES = (0.0, 0.7, 0.7, 1.0)
TOP_PS = (1.0, 1.0, 0.95)


def prompt(rng: random.Random) -> str:
    """One everyday ask with its blanks filled in."""
    thing, other = rng.sample(THINGS, 2)
    return rng.choice(TEMPLATES).format(
        name=rng.choice(NAMES), day=rng.choice(DAYS), topic=rng.choice(TOPICS), thing=thing, other_thing=other,
        code=rng.choice(CODE_ASKS), phrase=rng.choice(PHRASES), language=rng.choice(LANGUAGES),
    )


def messages(rng: random.Random) -> list[dict]:
    """A chat: sometimes a system line first, sometimes an earlier exchange (with a short reply) before the ask."""
    out: list[dict] = []
    if rng.random() < 0.3:
        out.append({"role": "system", "content": rng.choice(SYSTEM_LINES)})
    if rng.random() < 0.15:
        out.append({"role": "user", "content": prompt(rng)})
        out.append({"role": "assistant", "content": "Sure! Here is a short answer."})
        out.append({"role": "user", "content": rng.choice(FOLLOW_UPS)})
    else:
        out.append({"role": "user", "content": prompt(rng)})
    return out


def challenge_body(model: str, rng: random.Random) -> dict:
    """One ordinary-looking ``/v1/chat/completions`` body (prompt, temperature, length vary as users' do)."""
    return {
        "model": model,
        "messages": messages(rng),
        "max_tokens": rng.choice(MAX_TOKENS),
        "temperature": rng.choice(TEMPERATURES),
        "top_p": rng.choice(TOP_PS),
    }

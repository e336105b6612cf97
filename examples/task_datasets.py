"""Generate the built-in datasets of the evaluation scenarios (issue 29), as the quickstart's
`kubectl_dataset.py` generates its own: Chat-format JSONL (system, user, assistant), a pure
function of the seed and the split sizes (the same arguments write the same bytes), and no
request in two splits, so the test split measures generalisation.

- `support-tickets` (Classification): a customer's ticket -> the one of 8 queues it belongs
  to; the answer is exactly the queue's name. Tickets are put together from an issue of the
  queue (many phrasings, with products, order numbers, amounts and error codes drawn from
  large pools) and neutral sentences every queue shares (greetings, who the customer is,
  urgency, sign-offs), so the queue follows from what the customer asks, not from the
  ticket's shape; some tickets mention another queue's words in passing ("my order",
  "my account") without asking about them.
- `contact-extraction` (Extraction): an email signature, a meeting note, a CRM note or a chat
  message -> the contact's `name`, `company`, `email`, `phone` and `date` as compact JSON, keys
  in that order, a key only when the text gives it; the date is written in the text in one of
  several forms and answered as YYYY-MM-DD, the other values as the text spells them.
- `short-qa` (Extraction): a short paragraph about a fictional company, town, scientist or
  product (so world knowledge cannot answer) and a question -> the answer copied from the
  paragraph. Each paragraph holds two facts of the same type (two people, two years, two
  places), in shuffled order, so the question must be read to pick the right one.
- `english-to-veltish` (Translation): an English sentence -> Veltish, a small language with
  rules of its own (a lexicon, subject-object-verb order, adjectives after the noun, plural and
  tense endings, postpositions), invented so no model knows it beforehand. Every Veltish word
  of the validation and test sentences occurs in training; the sentences themselves are new.

    python examples/task_datasets.py                     # rewrite every committed dataset
    python examples/task_datasets.py support-tickets     # one of them
    python examples/task_datasets.py NAME --output DIR   # somewhere else
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SEED = 11
DEFAULT_SIZES = {"train": 600, "validation": 40, "test": 100}
DATASETS_DIR = Path(__file__).resolve().parents[1] / "trainer-image/src/kubetune_trainer/datasets"

Record = tuple[str, str]  # (user message, assistant answer)


# --- support-tickets -------------------------------------------------------------------------

QUEUES = (
    "billing", "account-access", "technical-issue", "shipping", "returns", "sales",
    "cancellation", "privacy",
)
"""The labels, in the order the system prompt lists them (the example manifest's
`evaluation.labels`)."""
TICKETS_SYSTEM = (
    "Route the customer's support ticket to one queue. Answer with exactly one of: "
    + ", ".join(QUEUES) + "."
)
PRODUCTS = (
    "the Pro plan", "the Team plan", "the mobile app", "the desktop app", "the web dashboard",
    "the Starter plan", "the analytics add-on", "the smart thermostat", "the wireless headset",
    "the standing desk", "the espresso machine", "the backup service", "the photo printer",
)
ITEMS = (
    "jacket", "pair of running shoes", "blender", "desk lamp", "phone case", "backpack",
    "coffee grinder", "keyboard", "monitor stand", "yoga mat", "kettle", "set of headphones",
)
CARRIERS = ("the courier", "the carrier", "the delivery driver", "the post office")
DEVICES = ("my iPhone", "my Android phone", "Windows 11", "my MacBook", "Chrome", "Firefox",
           "my iPad", "Safari")
ERRORS = ("error 500", "a blank white screen", "error code E-{n}", "a 'session expired' message",
          "a spinning wheel that never stops", "'something went wrong'")


def _order(rng: random.Random) -> str:
    return rng.choice(("#", "order ", "order #", "order no. ")) + str(rng.randrange(10000, 99999))


def _money(rng: random.Random) -> str:
    return rng.choice(("$", "EUR ", "£")) + f"{rng.randrange(5, 900)}.{rng.randrange(100):02d}"


def _error(rng: random.Random) -> str:
    return rng.choice(ERRORS).format(n=rng.randrange(100, 999))


def _billing(rng: random.Random) -> str:
    product, money = rng.choice(PRODUCTS), _money(rng)
    return rng.choice((
        f"I was charged {money} twice for {product} this month and only have one subscription.",
        f"My invoice for {product} shows {money} but the price on your site was lower. "
        "Can you correct the invoice?",
        "I need to update the credit card you charge every month; the old one expires soon.",
        f"Please add our VAT number to the invoices for {product}.",
        f"Where can I download the receipts for the {money} payments I made this year?",
        f"The payment of {money} for {product} failed and now I have an overdue invoice. "
        "How do I pay it?",
        "Why did my monthly charge go up? Nobody told me about a price change.",
        "Can I switch from paying by card to paying by bank transfer for our invoices?",
    ))


def _account_access(rng: random.Random) -> str:
    device = rng.choice(DEVICES)
    return rng.choice((
        "I can't log in. The password reset email never arrives.",
        f"My account is locked after too many login attempts on {device}.",
        "I lost my phone and can't get the two-factor code to sign in.",
        "Single sign-on stopped working for our team this morning; everyone gets sent back to "
        "the login page.",
        f"I reset my password but {device} still says the password is wrong.",
        "I changed my email address and now I can't sign in with either address.",
        "The verification code you text me is always expired by the time it arrives, so I "
        "can't get into my account.",
        "Someone else seems to have changed my password. I can't sign in anymore.",
    ))


def _technical_issue(rng: random.Random) -> str:
    product, device, error = rng.choice(PRODUCTS), rng.choice(DEVICES), _error(rng)
    return rng.choice((
        f"{_capital(product)} crashes every time I open it on {device}.",
        f"Exporting a report from {product} gives {error}.",
        f"Since the last update {product} is extremely slow to load on {device}.",
        f"Sync between {product} and {device} stopped working; changes never show up.",
        f"When I click save, {product} shows {error} and my changes are lost.",
        f"Notifications from {product} stopped arriving on {device} after the update.",
        f"The search in {product} returns no results even for things I know are there.",
        f"{_capital(product)} won't connect to the Wi-Fi; the setup shows {error}.",
    ))


def _shipping(rng: random.Random) -> str:
    order, item, carrier = _order(rng), rng.choice(ITEMS), rng.choice(CARRIERS)
    days = rng.randrange(3, 15)
    return rng.choice((
        f"Where is my {item}? {_capital(order)} was supposed to arrive {days} days ago.",
        f"The tracking number for {order} hasn't updated in {days} days.",
        f"I need to change the delivery address for {order} before it ships.",
        f"{_capital(carrier)} says {order} was delivered but nothing came.",
        f"Can you ship {order} with express delivery instead? I need the {item} by Friday.",
        f"My {item} from {order} is stuck in customs. What do I do?",
        f"{_capital(order)} still says 'preparing to ship' after {days} days.",
        f"Do you deliver to Canada? I want to send a {item} to my sister there.",
    ))


def _returns(rng: random.Random) -> str:
    order, item = _order(rng), rng.choice(ITEMS)
    return rng.choice((
        f"The {item} from {order} arrived broken. I want to send it back.",
        f"How do I return the {item}? It doesn't fit.",
        f"Can I exchange the {item} from {order} for a different colour?",
        f"I received the wrong {item} in {order} and need to return it for the right one.",
        f"I sent the {item} back two weeks ago. Has the return for {order} been processed?",
        f"Please send me a return label for {order}; the {item} is not what I expected.",
        f"The {item} stopped working after a week. Can I still return it?",
        f"Is it too late to return the {item}? I bought it {rng.randrange(10, 40)} days ago.",
    ))


def _sales(rng: random.Random) -> str:
    product, seats = rng.choice(PRODUCTS), rng.choice((10, 25, 40, 50, 120, 300, 1000))
    return rng.choice((
        f"We're a team of {seats} and want a quote for {product}.",
        f"Do you offer a volume discount for {seats} licences of {product}?",
        f"Could someone give our company a demo of {product} next week?",
        f"What does the enterprise version of {product} cost for {seats} users?",
        f"Is there a discount for non-profits or schools on {product}?",
        f"We'd like to upgrade {seats} people to {product}. Who can we talk to about pricing?",
        "I run a small shop and want to resell your products. Do you have a partner program?",
        f"Can we try {product} for a month before we buy it for {seats} people?",
    ))


def _cancellation(rng: random.Random) -> str:
    product = rng.choice(PRODUCTS)
    return rng.choice((
        f"Please cancel my subscription to {product} at the end of this month.",
        f"I want to stop the automatic renewal of {product}.",
        "Close my account please. I won't be using the service anymore.",
        f"How do I cancel {product}? I can't find the option anywhere.",
        f"We're moving to another provider; cancel our {product} contract when it ends.",
        f"Don't renew {product} next year, we no longer need it.",
        "I'd like to end my membership today.",
        f"Cancel {product} for my account, I signed up by mistake.",
    ))


def _privacy(rng: random.Random) -> str:
    return rng.choice((
        "Please delete all personal data you hold about me.",
        "Under GDPR I'm asking for a copy of all the data you store about me.",
        "Who else can see my personal information? Do you share it with advertisers?",
        "Stop using my data for marketing and remove me from every mailing list.",
        "I think my personal data was exposed in a breach. What happened to it?",
        "How long do you keep my address and phone number after I leave?",
        "I never agreed to you tracking my location. Turn it off and tell me what you stored.",
        "Please correct my date of birth and home address in your records; they are wrong.",
    ))


ISSUES: dict[str, Callable[[random.Random], str]] = {
    "billing": _billing, "account-access": _account_access, "technical-issue": _technical_issue,
    "shipping": _shipping, "returns": _returns, "sales": _sales, "cancellation": _cancellation,
    "privacy": _privacy,
}
GREETINGS = ("", "", "Hi,", "Hello,", "Hello team,", "Hi there,", "Good morning,", "Dear support,")
CONTEXTS = (
    "", "", "", "I've been a customer for {n} years.", "I run a small bakery and use you daily.",
    "Writing on behalf of our office manager.", "This is my second message about this.",
    "Our company signed up last spring.", "I'm on the go, so sorry for the short message.",
    # Another queue's words in passing, not what the ticket asks about.
    "I love your products and my last order was perfect.",
    "My account details are all up to date.",
)
URGENCY = ("", "", "", "Please help.", "This is urgent.", "Thanks in advance.",
           "Could you look into it today?", "I'd appreciate a quick reply.")
SIGN_OFFS = ("", "", "Thanks", "Best regards", "Cheers", "Thank you", "Kind regards")
FIRST_NAMES = (
    "Anna", "Ben", "Carla", "Dev", "Elif", "Farah", "Goran", "Hana", "Ivan", "Jun", "Kofi",
    "Lena", "Marco", "Nadia", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tariq", "Uma",
    "Victor", "Wen", "Ximena", "Yusuf", "Zoe", "Amara", "Bruno", "Chloe", "Diego", "Emma",
    "Felix", "Greta", "Hiro", "Isla", "Jonas", "Keiko", "Luis", "Mei", "Nils", "Olga", "Pablo",
)


def _capital(text: str) -> str:
    return text[0].upper() + text[1:]


def _ticket(rng: random.Random, queue: str) -> Record:
    parts = [
        rng.choice(GREETINGS),
        rng.choice(CONTEXTS).format(n=rng.randrange(2, 12)),
        ISSUES[queue](rng),
        rng.choice(URGENCY),
    ]
    sign_off = rng.choice(SIGN_OFFS)
    if sign_off:
        parts.append(f"{sign_off}, {rng.choice(FIRST_NAMES)}")
    return " ".join(part for part in parts if part), queue


def support_tickets(rng: random.Random, index: int) -> Record:
    # Queues rotate so every split holds every queue in equal shares.
    return _ticket(rng, QUEUES[index % len(QUEUES)])


# --- contact-extraction ----------------------------------------------------------------------

CONTACT_FIELDS = ("name", "company", "email", "phone", "date")
CONTACT_SYSTEM = (
    "Extract the contact from the text as compact JSON with the keys name, company, email, "
    "phone and date, in that order, and only those the text gives. Write the date as "
    "YYYY-MM-DD and every other value as the text spells it."
)
LAST_NAMES = (
    "Okafor", "Lindqvist", "Moreau", "Tanaka", "Kowalski", "Haddad", "Fernandes", "Novak",
    "Schmidt", "Iyer", "Brennan", "Castillo", "Dubois", "Eriksen", "Galloway", "Horvat",
    "Ishikawa", "Jansen", "Kaplan", "Larsen", "Mendez", "Nakamura", "O'Neill", "Petrov",
    "Quiroga", "Rossi", "Sato", "Thorne", "Usman", "Varga", "Whitfield", "Yilmaz", "Zhang",
)
COMPANY_HEADS = (
    "Northwind", "Bluepeak", "Ironleaf", "Silverline", "Redwood", "Brightwater", "Stonebridge",
    "Clearpath", "Greenfield", "Harborview", "Lumen", "Mosaic", "Nimbus", "Orchard", "Pinecrest",
    "Quarry", "Riverside", "Summit", "Tidewell", "Vantage", "Westgate", "Zephyr",
)
COMPANY_TAILS = (
    "Logistics", "Analytics", "Labs", "Foods", "Health", "Energy", "Robotics", "Media",
    "Consulting", "Capital", "Systems", "Design", "Pharma", "Textiles",
)
COMPANY_SUFFIXES = ("", "", " Ltd", " Inc.", " GmbH", " LLC", " AB")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _date(rng: random.Random) -> tuple[str, str]:
    """(as the text writes it, YYYY-MM-DD): every form names the year, so the date is decidable."""
    year, month, day = rng.randrange(2024, 2028), rng.randrange(1, 13), rng.randrange(1, 29)
    name = MONTHS[month - 1]
    written = rng.choice((
        f"{name} {day}, {year}", f"{day} {name} {year}", f"{name[:3]} {_ordinal(day)} {year}",
        f"{year}-{month:02d}-{day:02d}", f"{_ordinal(day)} of {name} {year}",
    ))
    return written, f"{year}-{month:02d}-{day:02d}"


def _phone(rng: random.Random) -> str:
    a, b, c = rng.randrange(200, 999), rng.randrange(100, 999), rng.randrange(1000, 9999)
    return rng.choice((
        f"+1 {a} {b} {c}", f"({a}) {b}-{c}", f"+44 20 {b} {c}", f"+49 30 {a}{b}",
        f"{a}-{b}-{c}", f"+46 8 {b} {c % 100:02d} {a % 100:02d}",
    ))


def _email(rng: random.Random, first: str, last: str, company: str) -> str:
    domain = company.split()[0].lower() + rng.choice((".com", ".io", ".co.uk", ".de", ".net"))
    local = rng.choice((f"{first}.{last}", f"{first[0]}{last}", first, f"{first}_{last[0]}"))
    return f"{local.lower().replace(chr(39), '')}@{domain}"


def _contact_text(rng: random.Random, style: int, c: dict[str, str], written_date: str) -> str:
    """The text for the fields in `c` (the date as `written_date`); `style` picks its kind."""
    name, company = c["name"], c.get("company")
    email, phone = c.get("email"), c.get("phone")
    at = f" at {company}" if company else ""
    if style == 0:  # an email signature under a short message
        lines = [rng.choice(("Thanks for the quick reply.", "Attached is the signed form.",
                             "Looking forward to working together.", "See my notes below."))]
        if "date" in c:
            lines.append(rng.choice((f"Let's talk again on {written_date}.",
                                     f"I'm out of office until {written_date}.")))
        lines += ["", rng.choice(("Best,", "Regards,", "Cheers,", "--")), name]
        if company:
            role = rng.choice(("Head of Sales", "CTO", "Buyer", "Account Manager"))
            lines.append(rng.choice((company, f"{role}, {company}")))
        if phone:
            lines.append(rng.choice((f"Tel: {phone}", f"Mobile {phone}", phone)))
        if email:
            lines.append(email)
        return "\n".join(lines)
    if style == 1:  # a meeting note
        sentence = rng.choice((f"Met {name}{at}", f"Call with {name}{at}",
                               f"Intro meeting: {name}{at}"))
        if "date" in c:
            sentence += rng.choice((f" on {written_date}", f", {written_date}"))
        sentence += ". " + rng.choice(("Interested in a pilot.", "Wants pricing by next week.",
                                       "Asked about integrations.", "Follow up on the contract."))
        reach = [f"email {email}"] if email else []
        reach += [f"phone {phone}"] if phone else []
        if reach:
            pronoun = rng.choice(("them", "her", "him"))
            sentence += f" Reach {pronoun} by {' or '.join(reach)}."
        return sentence
    if style == 2:  # a CRM note, field-like but not in the answer's order or words
        lines = []
        if company:
            lines.append(f"Account: {company}")
        lines.append(f"Contact person: {name}")
        if phone:
            lines.append(f"Direct line: {phone}")
        if email:
            lines.append(f"Mail: {email}")
        if "date" in c:
            lines.append(f"Next step due {written_date}")
        rng.shuffle(lines)
        return "\n".join(lines)
    # a chat message
    works = f" from {company}" if company else ""
    text = rng.choice((f"hey, this is {name}{at}", f"Hi! {name} here{works}",
                       f"Hello, my name is {name}{works}"))
    if email or phone:
        text += ". " + rng.choice(("You can reach me", "Contact me", "Best way to get me is"))
        text += " " + " or ".join(
            [f"at {email}"] * bool(email) + [f"on {phone}"] * bool(phone))
    if "date" in c:
        text += ". " + rng.choice((f"I'm free on {written_date}", f"Can we meet {written_date}?"))
    return text


def contact_extraction(rng: random.Random, index: int) -> Record:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    head, tail = rng.choice(COMPANY_HEADS), rng.choice(COMPANY_TAILS)
    company = f"{head} {tail}{rng.choice(COMPANY_SUFFIXES)}"
    contact = {"name": f"{first} {last}"}
    # Each optional field is present in about three records of four; the name always is.
    if rng.random() < 0.8:
        contact["company"] = company
    if rng.random() < 0.8:
        contact["email"] = _email(rng, first, last, company)
    if rng.random() < 0.7:
        contact["phone"] = _phone(rng)
    written_date, iso_date = _date(rng)
    if rng.random() < 0.6:
        contact["date"] = iso_date
    if "email" not in contact and "phone" not in contact and "date" not in contact:
        contact["email"] = _email(rng, first, last, company)
    text = _contact_text(rng, index % 4, contact, written_date)  # the kinds of text rotate
    answer = {key: contact[key] for key in CONTACT_FIELDS if key in contact}
    return text, json.dumps(answer, ensure_ascii=False, separators=(",", ":"))


# --- short-qa --------------------------------------------------------------------------------

QA_SYSTEM = "Answer the question with the exact words from the context, and nothing else."
SYLLABLES = ("ka", "lo", "mer", "vin", "tas", "dor", "el", "bru", "sen", "ria", "mon", "tel",
             "ost", "lin", "qua", "zer", "han", "pol", "dri", "ven", "sul", "mar", "no", "ith")
FIELDS_OF_WORK = ("glaciers", "bird migration", "soil bacteria", "tidal energy", "ancient glass",
                  "coral reefs", "cave ecosystems", "volcanic ash", "desert plants", "comets")
INDUSTRIES = ("welding robots", "solar roof tiles", "hearing aids", "cargo drones",
              "water filters", "electric ferries", "farm sensors", "museum lighting")


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {_word(rng, rng.choice((2, 3)))}"


def _two_years(rng: random.Random, first: tuple[int, int], gap: tuple[int, int]
               ) -> tuple[str, str]:
    """Two years of one life or history: the earlier in `first`, the later `gap` years on."""
    year = rng.randrange(*first)
    return str(year), str(year + rng.randrange(*gap))


def _qa_company(rng: random.Random) -> tuple[list[str], list[tuple[list[str], str]]]:
    name = f"{_word(rng, 2)} {rng.choice(COMPANY_TAILS)}"
    founder, chief = _person(rng), _person(rng)
    home, second = _word(rng, 2), _word(rng, 3)
    founded, expanded = _two_years(rng, (1850, 1995), (3, 30))
    staff, product = f"{rng.randrange(2, 90)},{rng.randrange(1000):03d}", rng.choice(INDUSTRIES)
    facts = [
        f"{name} was founded in {home} in {founded} by {founder}.",
        f"It opened its second factory, in {second}, in {expanded}.",
        f"The company employs about {staff} people and is best known for its {product}.",
        f"Its chief executive today is {chief}.",
    ]
    questions = [
        ([f"Who founded {name}?", f"Who was the founder of {name}?"], founder),
        ([f"Who is the chief executive of {name}?", f"Who runs {name} today?"], chief),
        ([f"In which town was {name} founded?", f"Where was {name} founded?"], home),
        ([f"Where is the second factory of {name}?",
          f"In which town did {name} open its second factory?"], second),
        ([f"When was {name} founded?", f"In what year was {name} founded?"], founded),
        ([f"When did {name} open its second factory?"], expanded),
        ([f"How many people does {name} employ?", f"How many employees does {name} have?"],
         staff),
        ([f"What is {name} best known for?"], product),
    ]
    return facts, questions


def _qa_town(rng: random.Random) -> tuple[list[str], list[tuple[list[str], str]]]:
    town, river, mountain = _word(rng, 3), _word(rng, 2), f"Mount {_word(rng, 2)}"
    chartered, bridged = _two_years(rng, (1100, 1800), (20, 300))
    mayor, architect = _person(rng), _person(rng)
    people = f"{rng.randrange(3, 400)},{rng.randrange(1000):03d}"
    facts = [
        f"{town} lies on the river {river}, in the shadow of {mountain}.",
        f"It received its town charter in {chartered}, and its first bridge was built in "
        f"{bridged}, designed by {architect}.",
        f"About {people} people live there, and the current mayor is {mayor}.",
    ]
    questions = [
        ([f"Which river does {town} lie on?", f"On what river is {town}?"], river),
        ([f"Which mountain is near {town}?"], mountain),
        ([f"When did {town} receive its town charter?"], chartered),
        ([f"When was the first bridge of {town} built?"], bridged),
        ([f"Who is the mayor of {town}?", f"Who is {town}'s current mayor?"], mayor),
        ([f"Who designed the first bridge of {town}?"], architect),
        ([f"How many people live in {town}?", f"What is the population of {town}?"], people),
    ]
    return facts, questions


def _qa_scientist(rng: random.Random) -> tuple[list[str], list[tuple[list[str], str]]]:
    scientist, mentor = _person(rng), _person(rng)
    born, prize = _two_years(rng, (1850, 1975), (28, 60))
    birthplace, university = _word(rng, 3), f"the University of {_word(rng, 2)}"
    subject = rng.choice(FIELDS_OF_WORK)
    facts = [
        f"{scientist} was born in {birthplace} in {born}.",
        f"{scientist.split()[0]} studied at {university} under {mentor}.",
        f"{scientist.split()[0]}'s work on {subject} won the {_word(rng, 2)} Medal in {prize}.",
    ]
    questions = [
        ([f"Where was {scientist} born?", f"What is the birthplace of {scientist}?"],
         birthplace),
        ([f"When was {scientist} born?", f"In which year was {scientist} born?"], born),
        ([f"Where did {scientist} study?"], university),
        ([f"Who was the teacher of {scientist}?", f"Under whom did {scientist} study?"], mentor),
        ([f"What did {scientist} work on?", f"What was the subject of {scientist}'s work?"],
         subject),
        ([f"When did {scientist} win the medal?", f"In what year was {scientist}'s work "
          "awarded a medal?"], prize),
    ]
    return facts, questions


def _qa_product(rng: random.Random) -> tuple[list[str], list[tuple[list[str], str]]]:
    product = f"the {_word(rng, 2)}-{rng.randrange(2, 99)}"
    maker, designer = f"{_word(rng, 2)} {rng.choice(COMPANY_TAILS)}", _person(rng)
    weight, battery = f"{rng.randrange(2, 95) / 10} kilograms", f"{rng.randrange(4, 72)} hours"
    launched, discontinued = _two_years(rng, (1960, 2016), (2, 9))
    colour = rng.choice(("dark green", "pale blue", "bright orange", "matte black", "silver"))
    facts = [
        f"{_capital(product)} is made by {maker} and was designed by {designer}.",
        f"It weighs {weight}, its battery lasts {battery}, and it came in {colour}.",
        f"It was launched in {launched} and discontinued in {discontinued}.",
    ]
    questions = [
        ([f"Who makes {product}?", f"Which company makes {product}?"], maker),
        ([f"Who designed {product}?"], designer),
        ([f"How much does {product} weigh?"], weight),
        ([f"How long does the battery of {product} last?"], battery),
        ([f"What colour did {product} come in?"], colour),
        ([f"When was {product} launched?"], launched),
        ([f"When was {product} discontinued?"], discontinued),
    ]
    return facts, questions


QA_TOPICS = (_qa_company, _qa_town, _qa_scientist, _qa_product)


def short_qa(rng: random.Random, index: int) -> Record:
    facts, questions = QA_TOPICS[index % len(QA_TOPICS)](rng)  # the kinds of topic rotate
    phrasings, answer = rng.choice(questions)
    # Sentences after the first keep their meaning in any order ("It" refers to the subject).
    facts = [facts[0], *rng.sample(facts[1:], len(facts) - 1)]
    return f"Context: {' '.join(facts)}\nQuestion: {rng.choice(phrasings)}", answer


# --- english-to-veltish ----------------------------------------------------------------------

TRANSLATION_SYSTEM = "Translate the English sentence into Veltish."
# Veltish is a small rule-based language, invented here so that no model knows it beforehand:
# its words come from the lexicon below, so every Veltish word of a test sentence was seen in
# training, but the sentence (its words, their number, tense and order) is new.
#   noun phrase: determiner, noun (+"i" when plural), adjective ("the old farmers" -> "la
#   tolvoi meski"); clause: subject, object, place, verb (subject-object-verb order); a
#   preposition follows its noun phrase ("in the garden" -> "la gardo en"); the verb's ending
#   gives the tense: "-as" present, "-is" past, "-os" future.
NOUNS = (  # (singular, plural, Veltish)
    ("farmer", "farmers", "tolvo"), ("child", "children", "kimo"), ("dog", "dogs", "hundo"),
    ("cat", "cats", "mirko"), ("bird", "birds", "pelo"), ("teacher", "teachers", "doseno"),
    ("doctor", "doctors", "kuraso"), ("fisherman", "fishermen", "piskero"),
    ("mouse", "mice", "muzo"), ("horse", "horses", "ekvo"), ("baker", "bakers", "panko"),
    ("sailor", "sailors", "maristo"), ("friend", "friends", "amiko"), ("king", "kings", "regro"),
    ("woman", "women", "vino"), ("man", "men", "viro"), ("letter", "letters", "lefo"),
    ("apple", "apples", "pomo"), ("book", "books", "libro"), ("boat", "boats", "barko"),
    ("river", "rivers", "rivo"), ("house", "houses", "domo"), ("garden", "gardens", "gardo"),
    ("market", "markets", "bazo"), ("forest", "forests", "arbaro"), ("cup", "cups", "taso"),
    ("key", "keys", "klefo"), ("song", "songs", "kanto"), ("stone", "stones", "lito"),
    ("bridge", "bridges", "ponto"), ("window", "windows", "fenestro"), ("lamp", "lamps", "lumo"),
)
ANIMATE = frozenset({
    "farmer", "child", "dog", "cat", "bird", "teacher", "doctor", "fisherman", "mouse", "horse",
    "baker", "sailor", "friend", "king", "woman", "man",
})
PLACES = ("river", "house", "garden", "market", "forest", "bridge")
ADJECTIVES = (
    ("old", "meski"), ("young", "juna"), ("big", "granda"), ("small", "eta"), ("red", "ruga"),
    ("green", "verda"), ("happy", "gaja"), ("tired", "lasa"), ("quiet", "kvieta"),
    ("clever", "saga"), ("brave", "kura"), ("new", "nova"), ("dark", "malhela"), ("kind", "bona"),
)
VERBS = (  # (base, third person singular, past, Veltish stem)
    ("see", "sees", "saw", "vid"), ("find", "finds", "found", "trov"), ("help", "helps",
    "helped", "help"), ("follow", "follows", "followed", "sekv"), ("carry", "carries",
    "carried", "port"), ("draw", "draws", "drew", "desegn"), ("hear", "hears", "heard", "aud"),
    ("like", "likes", "liked", "sat"), ("wash", "washes", "washed", "lav"), ("paint", "paints",
    "painted", "pentr"), ("visit", "visits", "visited", "vizit"), ("watch", "watches",
    "watched", "rigard"), ("call", "calls", "called", "vok"), ("remember", "remembers",
    "remembered", "memor"),
)
TENSES = {"present": "as", "past": "is", "future": "os"}
DETERMINERS = {"the": "la", "a": "un", "my": "mia", "this": "tiu", "some": "kelk"}
PREPOSITIONS = {"in": "en", "near": "apud", "behind": "malantau", "under": "sub"}


def _noun_phrase(rng: random.Random, nouns: tuple[tuple[str, str, str], ...],
                 plural_allowed: bool = True) -> tuple[str, str, bool]:
    """(English, Veltish, plural?) of a noun phrase drawn from `nouns`."""
    singular, plural_form, veltish = rng.choice(nouns)
    plural = plural_allowed and rng.random() < 0.35
    determiner = rng.choice(("the", "my", "some") if plural else ("the", "a", "my", "this"))
    adjective = rng.choice(ADJECTIVES) if rng.random() < 0.5 else None
    words = [adjective[0]] if adjective else []
    words.append(plural_form if plural else singular)
    article = determiner
    if determiner == "a" and words[0][0] in "aeiou":
        article = "an"
    english = " ".join([article, *words])
    target = [DETERMINERS[determiner], veltish + ("i" if plural else "")]
    if adjective:
        target.append(adjective[1])
    return english, " ".join(target), plural


def english_to_veltish(rng: random.Random, index: int) -> Record:
    animate = tuple(noun for noun in NOUNS if noun[0] in ANIMATE)
    subject, subject_veltish, plural = _noun_phrase(rng, animate)
    obj, obj_veltish, _ = _noun_phrase(rng, NOUNS)
    base, third, past, stem = rng.choice(VERBS)
    tense = tuple(TENSES)[index % len(TENSES)]  # the tenses rotate
    verb = {"present": base if plural else third, "past": past, "future": f"will {base}"}[tense]
    english = [subject, verb, obj]
    veltish = [subject_veltish, obj_veltish]
    if rng.random() < 0.4:
        place = tuple(noun for noun in NOUNS if noun[0] in PLACES)
        preposition = rng.choice(list(PREPOSITIONS))
        where, where_veltish, _ = _noun_phrase(rng, place, plural_allowed=False)
        english.append(f"{preposition} {where}")
        veltish.append(f"{where_veltish} {PREPOSITIONS[preposition]}")
    veltish.append(stem + TENSES[tense])
    return _capital(" ".join(english)) + ".", _capital(" ".join(veltish)) + "."


# --- the datasets ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskDataset:
    """One built-in dataset: its system prompt and how record `index` of a split is drawn."""

    system: str
    record: Callable[[random.Random, int], Record]


DATASETS: dict[str, TaskDataset] = {
    "support-tickets": TaskDataset(TICKETS_SYSTEM, support_tickets),
    "contact-extraction": TaskDataset(CONTACT_SYSTEM, contact_extraction),
    "short-qa": TaskDataset(QA_SYSTEM, short_qa),
    "english-to-veltish": TaskDataset(TRANSLATION_SYSTEM, english_to_veltish),
}


def chat_record(system: str, request: str, answer: str) -> dict[str, list[dict[str, str]]]:
    """One training record in Chat format."""
    return {"messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": request},
        {"role": "assistant", "content": answer},
    ]}


def generate(name: str, seed: int = DEFAULT_SEED, sizes: dict[str, int] | None = None
             ) -> dict[str, list[Record]]:
    """Splits of distinct requests of dataset `name`; a request never appears in two splits."""
    dataset = DATASETS[name]
    sizes = sizes or DEFAULT_SIZES
    rng = random.Random(f"{name}:{seed}")
    seen: set[str] = set()
    splits: dict[str, list[Record]] = {}
    for split, size in sizes.items():
        records: list[Record] = []
        while len(records) < size:
            request, answer = dataset.record(rng, len(records))
            if request.lower() not in seen:
                seen.add(request.lower())
                records.append((request, answer))
        rng.shuffle(records)
        splits[split] = records
    return splits


def write_splits(name: str, output: Path, seed: int = DEFAULT_SEED,
                 sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write `<split>.jsonl` files of dataset `name` into `output`; returns their paths."""
    output.mkdir(parents=True, exist_ok=True)
    system = DATASETS[name].system
    paths = {}
    for split, records in generate(name, seed, sizes).items():
        path = output / f"{split}.jsonl"
        lines = (json.dumps(chat_record(system, *record), ensure_ascii=False)
                 for record in records)
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        paths[split] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"datasets to write, of {', '.join(DATASETS)} (all when none)")
    parser.add_argument("--output", type=Path, help="directory (one dataset only)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    for split, size in DEFAULT_SIZES.items():
        parser.add_argument(f"--{split}", type=int, default=size, help=f"{split} records")
    args = parser.parse_args(argv)
    names = args.names or list(DATASETS)
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        parser.error(f"unknown dataset {', '.join(unknown)}; known: {', '.join(DATASETS)}")
    if args.output is not None and len(names) != 1:
        parser.error("--output needs exactly one dataset name")
    sizes = {split: getattr(args, split) for split in DEFAULT_SIZES}
    for name in names:
        output = args.output or DATASETS_DIR / name
        for split, path in write_splits(name, output, args.seed, sizes).items():
            print(f"{name} {split}: {sizes[split]} records -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

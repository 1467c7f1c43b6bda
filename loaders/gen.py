"""Synthetic marketing / CDP datasets in the format of docs/data-format.md (`bitseg gen`).

Everything is generated column-wise with numpy, chunk by chunk of profiles, and
formatted by gluing precomputed JSON fragments, so memory stays bounded and the
output is byte-identical for the same seed and arguments.

Internal consistency a test or a demo can rely on:
- every event and order belongs to a generated profile and happens at or after
  its `created_at`; only `points_accrued` events are ever future-dated (at most
  14 days after as_of), everything else has `ts <= as_of`;
- a profile's `points` is the sum of its `points_accrued` events with `ts <= as_of`;
- a profile's `ltv` is the sum of the amounts of its `paid` and `delivered` orders;
- `age` (when present next to `birthday`) is the age at as_of of that birthday;
- a SKU always has the same brand, category and list price (the catalog does not
  depend on the seed); an order's `amount` is exactly sum(qty * price).
"""

from __future__ import annotations

import gzip as gzip_module
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import orjson
from tqdm import tqdm

DEFAULT_AS_OF = datetime(2026, 11, 1, tzinfo=timezone.utc)

# Profiles per chunk (at most). Part of the output's identity: changing it changes the bytes.
CHUNK = 50_000
# Rows formatted per write, so string memory stays bounded whatever the activity skew.
WRITE_ROWS = 250_000
GZIP_LEVEL = 1  # level 6 is ~25% smaller but halves the generator's speed
# Upper bound on rows generated per chunk; only extreme per-profile rates shrink the chunk.
ROWS_PER_CHUNK = 2_500_000

DAY = 86_400
CREATED_DAYS = 3 * 365
EVENT_DAYS = 400
ORDER_DAYS = 2 * 365
FUTURE_DAYS = 14
FUTURE_POINTS_SHARE = 0.10
FEB29_SHARE = 0.004  # far above nature's 0.07%, so anniversary edge cases show up in small sets
CATALOG_SEED = 20_261_101  # the SKU catalog is the same in every dataset

FILES = ("profiles", "events", "orders")

# --------------------------------------------------------------------------- vocabularies

COUNTRY_CITIES: dict[str, tuple[str, ...]] = {
    "DE": ("Berlin", "Hamburg", "Munich", "Cologne", "Frankfurt", "Stuttgart", "Düsseldorf",
           "Leipzig", "Dortmund", "Essen", "Bremen", "Dresden", "Hanover", "Nuremberg",
           "Duisburg", "Bochum", "Wuppertal", "Bielefeld", "Bonn", "Münster"),
    "FR": ("Paris", "Marseille", "Lyon", "Toulouse", "Nice", "Nantes", "Montpellier",
           "Strasbourg", "Bordeaux", "Lille", "Rennes", "Reims", "Toulon", "Saint-Étienne",
           "Le Havre", "Grenoble", "Dijon", "Angers"),
    "US": ("New York", "Los Angeles", "Chicago", "Houston", "Phoenix", "Philadelphia",
           "San Antonio", "San Diego", "Dallas", "San Jose", "Austin", "Jacksonville",
           "Seattle", "Denver", "Boston", "Miami", "Atlanta", "Portland", "San Francisco",
           "Minneapolis"),
    "GB": ("London", "Birmingham", "Manchester", "Glasgow", "Leeds", "Liverpool", "Bristol",
           "Sheffield", "Edinburgh", "Leicester", "Cardiff", "Nottingham", "Newcastle",
           "Belfast", "Brighton", "Southampton"),
    "IT": ("Rome", "Milan", "Naples", "Turin", "Palermo", "Genoa", "Bologna", "Florence",
           "Bari", "Catania", "Venice", "Verona", "Messina", "Padua", "Trieste"),
    "ES": ("Madrid", "Barcelona", "Valencia", "Seville", "Zaragoza", "Málaga", "Murcia",
           "Palma", "Las Palmas", "Bilbao", "Alicante", "Córdoba", "Valladolid", "Vigo"),
    "NL": ("Amsterdam", "Rotterdam", "The Hague", "Utrecht", "Eindhoven", "Groningen",
           "Tilburg", "Almere", "Breda", "Nijmegen", "Haarlem", "Arnhem"),
    "PL": ("Warsaw", "Kraków", "Łódź", "Wrocław", "Poznań", "Gdańsk", "Szczecin", "Bydgoszcz",
           "Lublin", "Białystok", "Katowice", "Gdynia"),
    "BE": ("Brussels", "Antwerp", "Ghent", "Charleroi", "Liège", "Bruges", "Namur", "Leuven",
           "Mons", "Mechelen"),
    "AT": ("Vienna", "Graz", "Linz", "Salzburg", "Innsbruck", "Klagenfurt", "Villach", "Wels",
           "Sankt Pölten", "Dornbirn"),
    "CH": ("Zurich", "Geneva", "Basel", "Lausanne", "Bern", "Winterthur", "Lucerne",
           "St. Gallen", "Lugano", "Biel"),
    "SE": ("Stockholm", "Gothenburg", "Malmö", "Uppsala", "Västerås", "Örebro", "Linköping",
           "Helsingborg", "Jönköping", "Norrköping"),
    "DK": ("Copenhagen", "Aarhus", "Odense", "Aalborg", "Esbjerg", "Randers", "Kolding",
           "Horsens"),
    "NO": ("Oslo", "Bergen", "Trondheim", "Stavanger", "Drammen", "Fredrikstad",
           "Kristiansand", "Tromsø"),
    "PT": ("Lisbon", "Porto", "Vila Nova de Gaia", "Amadora", "Braga", "Funchal", "Coimbra",
           "Setúbal"),
    "IE": ("Dublin", "Cork", "Limerick", "Galway", "Waterford", "Drogheda", "Kilkenny",
           "Sligo"),
    "CZ": ("Prague", "Brno", "Ostrava", "Plzeň", "Liberec", "Olomouc", "České Budějovice",
           "Hradec Králové"),
    "CA": ("Toronto", "Montreal", "Vancouver", "Calgary", "Edmonton", "Ottawa", "Winnipeg",
           "Quebec City", "Hamilton", "Kitchener", "Halifax", "Victoria"),
    "AU": ("Sydney", "Melbourne", "Brisbane", "Perth", "Adelaide", "Gold Coast", "Canberra",
           "Newcastle", "Hobart", "Darwin"),
    "JP": ("Tokyo", "Yokohama", "Osaka", "Nagoya", "Sapporo", "Fukuoka", "Kobe", "Kawasaki",
           "Kyoto", "Saitama", "Hiroshima", "Sendai"),
}
COUNTRIES = tuple(COUNTRY_CITIES)
REGIONS = ("EU", "NA", "APAC")
COUNTRY_REGION = {c: "NA" if c in ("US", "CA") else "APAC" if c in ("AU", "JP") else "EU"
                  for c in COUNTRIES}

TAGS = ("newsletter", "app_user", "loyalty_member", "returning", "new_customer",
        "bargain_hunter", "churn_risk", "gift_buyer", "high_value", "vip", "eco_conscious",
        "early_adopter", "b2b", "beta_tester", "influencer")
TAG_WEIGHTS = (40, 30, 25, 22, 15, 14, 12, 8, 7, 6, 6, 5, 3, 2, 1)
TAG_COUNT_P = (0.35, 0.30, 0.20, 0.10, 0.05)  # P(0 tags), P(1 tag), ... P(4 tags)

GENDERS, GENDER_P = ("female", "male", "diverse"), (0.50, 0.48, 0.02)
PLANS, PLAN_P = ("free", "basic", "premium", "business"), (0.62, 0.20, 0.14, 0.04)

STATUSES = ("paid", "delivered", "refunded", "cancelled", "pending")
# Status mix by order age: < 3 days, < 14 days, older.
STATUS_P = ((0.40, 0.00, 0.00, 0.05, 0.55),
            (0.45, 0.40, 0.04, 0.06, 0.05),
            (0.04, 0.78, 0.08, 0.08, 0.02))
LTV_STATUSES = ("paid", "delivered")
CHANNELS, CHANNEL_P = ("web", "app", "store"), (0.55, 0.30, 0.15)
SOURCES = ("email", "direct", "paid_search", "social", "affiliate", "organic")
SOURCE_P = (0.18, 0.24, 0.20, 0.12, 0.08, 0.18)
CURRENCY = "EUR"

BRANDS = ("acme", "zenith", "nova", "orbit", "lumen", "vertex", "pioneer", "summit", "atlas",
          "helix")
CATEGORY_PRICE = {"shoes": 80.0, "apparel": 40.0, "electronics": 150.0, "home": 50.0,
                  "beauty": 20.0, "sports": 60.0, "toys": 25.0, "books": 15.0}
CATEGORIES = tuple(CATEGORY_PRICE)
SKUS = 400
DISCOUNTS, DISCOUNT_P = (1.0, 0.9, 0.8, 0.7, 0.5), (0.70, 0.12, 0.10, 0.05, 0.03)
QTY_P = (0.78, 0.15, 0.04, 0.02, 0.01)  # qty 1..5
ITEMS_P = (0.45, 0.25, 0.15, 0.10, 0.05)  # 1..5 items per order

HOUR_WEIGHTS = (2, 1, 1, 1, 1, 2, 4, 6, 8, 9, 9, 9, 10, 10, 9, 9, 9, 10, 11, 12, 12, 10, 7, 4)

# (value, weight, months it is live in, or None for all year)
Seasonal = Sequence[tuple[str, float, tuple[int, ...] | None]]
POPUPS: Seasonal = (
    ("welcome", 3, None), ("exit_intent", 2, None), ("newsletter", 2, None),
    ("discount_10", 1.5, None), ("new_year", 6, (1,)), ("valentines", 5, (2,)),
    ("spring", 6, (3, 4, 5)), ("summer", 6, (6, 7, 8)), ("back_to_school", 5, (8, 9)),
    ("halloween", 5, (10,)), ("black_friday", 12, (11,)), ("xmas", 8, (12,)),
)
CAMPAIGNS: Seasonal = (
    ("weekly_digest", 6, None), ("welcome_series", 2, None), ("cart_reminder", 2, None),
    ("winback", 1.5, None), ("birthday", 1, None), ("loyalty_update", 1.5, None),
    ("product_launch", 1.5, None), ("new_year", 4, (1,)), ("valentines", 4, (2,)),
    ("spring_sale", 5, (3, 4)), ("easter", 3, (3, 4)), ("summer_sale", 5, (6, 7)),
    ("back_to_school", 4, (8, 9)), ("halloween", 3, (10,)), ("black_friday", 10, (11,)),
    ("cyber_monday", 6, (11, 12)), ("xmas_gifts", 8, (12,)),
)
PAGES = ("/", "/products", "/sale", "/cart", "/new", "/search", "/account", "/checkout",
         "/wishlist", "/blog", "/help", "/stores") + tuple(f"/c/{c}" for c in CATEGORIES)
QUERIES = ("sneakers", "jacket", "headphones", "dress", "running shoes", "jeans", "gift card",
           "laptop", "sale", "backpack", "boots", "t-shirt", "perfume", "lamp", "yoga mat",
           "watch", "lego", "charger", "sofa", "lipstick", "football", "puzzle", "cookbook",
           "novel", "phone case")
PLATFORMS, PLATFORM_P = ("android", "ios"), (0.54, 0.46)
POINTS = (5, 10, 20, 25, 50, 100, 200, 500)
POINTS_P = (10, 20, 12, 15, 20, 12, 5, 2)

# Event types and their share before the per-profile adjustments in _event_types().
EVENT_WEIGHTS = {"page_view": 38, "search": 9, "add_to_cart": 8, "app_open": 9, "login": 4,
                 "email_opened": 12, "email_clicked": 3, "popup_opened": 7, "popup_filled": 2,
                 "points_accrued": 6}
EVENT_NAMES = tuple(EVENT_WEIGHTS)
EV = {name: i for i, name in enumerate(EVENT_NAMES)}

SCHEMA = {
    "profiles": {"country": "keyword", "city": "keyword", "tags": "keywords", "age": "int",
                 "gender": "keyword", "subscribed": "bool", "birthday": "date",
                 "created_at": "timestamp", "plan": "keyword", "points": "int",
                 "ltv": "float"},
    "events": {"page": "keyword", "popup": "keyword", "campaign": "keyword",
               "platform": "keyword", "points": "int", "query": "keyword", "sku": "keyword",
               "category": "keyword", "price": "float"},
    "orders": {"status": "keyword", "channel": "keyword", "region": "keyword",
               "source": "keyword", "amount": "float", "currency": "keyword",
               "items.sku": "keyword", "items.category": "keyword", "items.brand": "keyword",
               "items.qty": "int", "items.price": "float"},
}

# --------------------------------------------------------------------------- small helpers


def _p(weights: Sequence[float]) -> np.ndarray:
    """Weights normalised to probabilities."""
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def _zipf(n: int, s: float = 1.0) -> np.ndarray:
    """Zipf probabilities for ranks 1..n."""
    return _p(1.0 / np.arange(1, n + 1) ** s)


def _cdf(p: np.ndarray) -> np.ndarray:
    """A cumulative distribution whose last entry is exactly 1 (so searchsorted stays in range)."""
    c = np.cumsum(p, axis=-1)
    c[..., -1] = 1.0
    return c


def _draw(rng: np.random.Generator, p: np.ndarray, n: int) -> np.ndarray:
    """n indices drawn from the probabilities p."""
    return np.searchsorted(_cdf(p), rng.random(n), side="right").astype(np.int64)


def _money(cents: np.ndarray) -> list[str]:
    """Integer cents as the shortest JSON float text (1520.5, 0.0, 49.99)."""
    return list(map(repr, (cents / 100).tolist()))


def _table(fragments: Sequence[str], null: str = "") -> np.ndarray:
    """Fragments as an object array; index -1 is "" (key omitted), -2 the explicit null."""
    return np.array([*fragments, null, ""], dtype=object)


def _by_unique(values: np.ndarray, fmt: Callable[[Any], str]) -> np.ndarray:
    """fmt applied once per distinct value, spread back over values (object array)."""
    uniq, inverse = np.unique(values, return_inverse=True)
    return np.array([fmt(v) for v in uniq.tolist()], dtype=object)[inverse.reshape(-1)]


def _missing(rng: np.random.Generator, codes: np.ndarray, omitted: float, null: float) -> None:
    """Marks a share of codes as omitted (-1) or explicit null (-2), in place."""
    u = rng.random(len(codes))
    codes[u < omitted + null] = -1
    codes[u < null] = -2


def _rows(n: int, columns: Sequence[object]) -> str:
    """Concatenates n rows of string fragments, column by column (a column may be one str)."""
    grid = np.empty((n, len(columns)), dtype=object)
    for j, column in enumerate(columns):
        grid[:, j] = column
    return "".join(grid.ravel().tolist())


# --------------------------------------------------------------------------- lookup tables


@lru_cache(maxsize=1)
def _time_of_day() -> np.ndarray:
    """'HH:MM:SSZ"' for every second of a day, closing the ts string."""
    return np.array([f"{h:02d}:{m:02d}:{s:02d}Z\"" for h in range(24) for m in range(60)
                     for s in range(60)], dtype=object)


@dataclass(frozen=True)
class _Days:
    """'YYYY-MM-DDT' and the month (0-11) of every day in a range of epoch days."""

    first: int
    text: np.ndarray
    month: np.ndarray

    @classmethod
    def spanning(cls, first: int, last: int) -> _Days:
        days = np.arange(first, last + 1).astype("datetime64[D]")
        text = np.array([d + "T" for d in np.datetime_as_string(days).tolist()], dtype=object)
        month = days.astype("datetime64[M]").astype(np.int64) % 12
        return cls(first, text, month)


@dataclass(frozen=True)
class _Catalog:
    """The fixed SKU catalog and every precomputed item fragment."""

    brand: np.ndarray
    category: np.ndarray
    price: np.ndarray  # list price, integer cents
    popularity: np.ndarray
    names: tuple[str, ...]
    items: np.ndarray  # [first | rest, (sku*len(DISCOUNTS)+discount)*5 + qty-1] -> JSON object
    unit_cents: np.ndarray  # (sku, discount) -> charged cents


@lru_cache(maxsize=1)
def _catalog() -> _Catalog:
    """SKUs with a fixed brand, category and list price (same in every dataset)."""
    rng = np.random.default_rng(CATALOG_SEED)
    brand = _draw(rng, _zipf(len(BRANDS), 0.8), SKUS)
    category = rng.integers(0, len(CATEGORIES), SKUS)
    median = np.array([CATEGORY_PRICE[c] for c in CATEGORIES])[category]
    euros = np.maximum(1, np.rint(median * rng.lognormal(0.0, 0.5, SKUS))).astype(np.int64)
    ending = np.array([99, 95, 50, 100])[_draw(rng, _p((6, 2, 1, 1)), SKUS)]
    price = euros * 100 - 100 + ending
    popularity = _zipf(SKUS, 0.9)[rng.permutation(SKUS)]
    names = tuple(f"{BRANDS[b][:3].upper()}-{i:04d}" for i, b in enumerate(brand.tolist()))
    unit = np.rint(price[:, None] * np.array(DISCOUNTS)[None, :]).astype(np.int64)
    items = []
    for s in range(SKUS):
        head = (f'{{"sku":"{names[s]}","category":"{CATEGORIES[category[s]]}",'
                f'"brand":"{BRANDS[brand[s]]}","qty":')
        for cents in unit[s].tolist():
            price_text = repr(cents / 100)
            items.extend(f'{head}{q},"price":{price_text}}}' for q in range(1, 6))
    first = np.array(items, dtype=object)
    rest = np.array(["," + s for s in items], dtype=object)
    return _Catalog(brand, category, price, popularity, names, np.stack([first, rest]), unit)


@dataclass(frozen=True)
class _EventCatalog:
    """Per event type: the '","ts":"' middle, its property-value tails and their monthly odds."""

    mids: np.ndarray  # type -> 'name","ts":"'
    tails: np.ndarray  # code -> ',"prop":value}\n'
    offset: np.ndarray  # type -> first code
    cdfs: tuple[np.ndarray, ...]  # type -> (12, values) cumulative odds by month
    points: np.ndarray  # code -> points of a points_accrued tail, else 0


def _seasonal(values: Seasonal) -> tuple[list[str], np.ndarray]:
    """Value names and a (12, n) matrix of odds by month."""
    odds = np.zeros((12, len(values)))
    for j, (_, weight, months) in enumerate(values):
        live = range(12) if months is None else [m - 1 for m in months]
        odds[list(live), j] = weight
    return [v for v, _, _ in values], odds / odds.sum(axis=1, keepdims=True)


def _flat(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Odds that do not depend on the month."""
    return np.tile(_p(p), (12, 1))


@lru_cache(maxsize=1)
def _event_catalog() -> _EventCatalog:
    """Every event type's JSON fragments and value odds."""
    cat = _catalog()
    popups, popup_odds = _seasonal(POPUPS)
    campaigns, campaign_odds = _seasonal(CAMPAIGNS)
    sku_tails = [f',"sku":"{cat.names[s]}","category":"{CATEGORIES[cat.category[s]]}",'
                 f'"price":{price}}}\n' for s, price in enumerate(_money(cat.price))]
    spec: dict[str, tuple[list[str], np.ndarray]] = {
        "page_view": ([f',"page":"{p}"}}\n' for p in PAGES], _flat(_zipf(len(PAGES)))),
        "search": ([f',"query":"{q}"}}\n' for q in QUERIES], _flat(_zipf(len(QUERIES), 0.8))),
        "add_to_cart": (sku_tails, _flat(cat.popularity)),
        "app_open": ([f',"platform":"{p}"}}\n' for p in PLATFORMS], _flat(PLATFORM_P)),
        "login": (["}\n"], _flat([1.0])),
        "email_opened": ([f',"campaign":"{c}"}}\n' for c in campaigns], campaign_odds),
        "email_clicked": ([f',"campaign":"{c}"}}\n' for c in campaigns], campaign_odds),
        "popup_opened": ([f',"popup":"{p}"}}\n' for p in popups], popup_odds),
        "popup_filled": ([f',"popup":"{p}"}}\n' for p in popups], popup_odds),
        "points_accrued": ([f',"points":{v}}}\n' for v in POINTS], _flat(POINTS_P)),
    }
    tails: list[str] = []
    offsets, cdfs, points = [], [], []
    for name in EVENT_NAMES:
        texts, odds = spec[name]
        offsets.append(len(tails))
        tails.extend(texts)
        cdfs.append(_cdf(odds))
        points.extend(POINTS if name == "points_accrued" else [0] * len(texts))
    mids = np.array([f'{name}","ts":"' for name in EVENT_NAMES], dtype=object)
    return _EventCatalog(mids, np.array(tails, dtype=object), np.array(offsets),
                         tuple(cdfs), np.array(points, dtype=np.int64))


# --------------------------------------------------------------------------- time


def _epoch_seconds(as_of: datetime | None) -> int:
    """as_of as whole epoch seconds (naive means UTC)."""
    moment = DEFAULT_AS_OF if as_of is None else as_of
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return math.floor(moment.timestamp())


def parse_present(text: str) -> datetime:
    """`gen --present`: "now" (this instant) or an ISO 8601 time; without a zone it is UTC."""
    if text == "now":
        return datetime.now(timezone.utc)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"expected 'now' or an ISO 8601 time such as 2026-11-01T00:00:00Z, "
                         f"got {text!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _moments(rng: np.random.Generator, lo: np.ndarray, hi: int | np.ndarray) -> np.ndarray:
    """Epoch seconds in [lo, hi] per row: a uniform day, a daily-rhythm time of day."""
    span = np.asarray(hi - lo, dtype=np.int64)
    ts = lo + (rng.random(len(lo)) * (span + 1)).astype(np.int64)
    hour = _draw(rng, _p(HOUR_WEIGHTS), len(lo))
    ts = ts // DAY * DAY + hour * 3600 + rng.integers(0, 3600, len(lo))
    return np.clip(ts, lo, hi)


def _recent(rng: np.random.Generator, n: int, as_of: int, days: int) -> np.ndarray:
    """Signup moments within `days` before as_of, denser toward the present (growth)."""
    ago = (1.0 - rng.random(n) ** 0.6) * days * DAY
    return np.minimum(as_of - ago.astype(np.int64), as_of - 1)


# --------------------------------------------------------------------------- profiles


@dataclass
class _Profiles:
    """One chunk of profiles as columns."""

    start: int
    n: int
    country: np.ndarray  # index into COUNTRIES, -1 omitted
    city: np.ndarray  # index into the flat city list, -1 omitted, -2 null
    tags: np.ndarray  # bit mask over TAGS
    age: np.ndarray  # -1 omitted, -2 null
    gender: np.ndarray
    subscribed: np.ndarray  # 0 false, 1 true, -1 omitted
    birthday: np.ndarray  # epoch days
    has_birthday: np.ndarray  # 1 present, -1 omitted, -2 null
    created: np.ndarray  # epoch seconds
    plan: np.ndarray


@lru_cache(maxsize=1)
def _cities() -> tuple[tuple[str, ...], np.ndarray, tuple[np.ndarray, ...]]:
    """The flat city list, each country's first index in it, and each country's city odds."""
    flat = tuple(c for cities in COUNTRY_CITIES.values() for c in cities)
    sizes = [len(c) for c in COUNTRY_CITIES.values()]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return flat, starts, tuple(_zipf(s, 1.1) for s in sizes)


def _pick_cities(rng: np.random.Generator, country: np.ndarray) -> np.ndarray:
    """A city of each profile's country, big cities more likely."""
    _, starts, odds = _cities()
    city = np.zeros(len(country), dtype=np.int64)
    for c in range(len(COUNTRIES)):
        rows = np.flatnonzero(country == c)
        city[rows] = starts[c] + _draw(rng, odds[c], len(rows))
    return city


def _pick_tags(rng: np.random.Generator, n: int) -> np.ndarray:
    """0-4 distinct tags per profile as bit masks (weighted sampling without replacement)."""
    count = _draw(rng, _p(TAG_COUNT_P), n)
    # Exponential race: the k smallest Exp(1)/w are a weighted sample without replacement.
    race = rng.standard_exponential((n, len(TAGS)), dtype=np.float32)
    rank = np.argsort(race / np.array(TAG_WEIGHTS, dtype=np.float32), axis=1)
    chosen = np.arange(len(TAGS))[None, :] < count[:, None]
    bits = np.where(chosen, np.int64(1) << rank, 0)
    return bits.sum(axis=1)


def _date_parts(days: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Year, month (1-12) and day of month of epoch days."""
    d = days.astype("datetime64[D]")
    year = d.astype("datetime64[Y]")
    month = d.astype("datetime64[M]")
    return (year.astype(np.int64) + 1970, (month - year).astype(np.int64) + 1,
            (d - month).astype(np.int64) + 1)


def _feb29(year: np.ndarray) -> np.ndarray:
    """Epoch day of Feb 29 in the leap year at or before each year (1901-2099)."""
    leap = year - year % 4
    return (leap - 1970).astype("datetime64[Y]").astype("datetime64[D]").astype(np.int64) + 59


def _birthdays(rng: np.random.Generator, n: int, as_of: int) -> tuple[np.ndarray, np.ndarray]:
    """Birthdays (epoch days) for adults, a few on Feb 29, and the age each gives at as_of."""
    today = as_of // DAY
    # Adults only, skewed toward the 30s with a long tail (mean ~41, rarely past 90).
    years = np.minimum(18.01 + rng.gamma(3.0, 7.5, n), 99.0)
    born = today - (years * 365.2425).astype(np.int64)
    y, _, _ = _date_parts(born)
    leap = rng.random(n) < FEB29_SHARE
    born[leap] = _feb29(y[leap])
    y, m, d = _date_parts(born)
    ty, tm, td = _date_parts(np.array([today]))
    age = ty[0] - y - ((m * 100 + d) > (tm[0] * 100 + td[0]))
    return born, age


def _profiles(rng: np.random.Generator, start: int, n: int, as_of: int) -> _Profiles:
    """Static attributes of profiles start .. start+n-1."""
    country = _draw(rng, _zipf(len(COUNTRIES), 1.0), n)
    city = _pick_cities(rng, country)
    _missing(rng, country, 0.015, 0.0)
    city[country < 0] = -1
    _missing(rng, city, 0.04, 0.005)
    tags = _pick_tags(rng, n)
    newsletter = (tags & 1).astype(bool)
    subscribed = (rng.random(n) < np.where(newsletter, 0.9, 0.35)).astype(np.int64)
    _missing(rng, subscribed, 0.03, 0.0)
    birthday, age = _birthdays(rng, n, as_of)
    has_birthday = np.ones(n, dtype=np.int64)
    _missing(rng, has_birthday, 0.14, 0.01)
    _missing(rng, age, 0.07, 0.01)
    gender = _draw(rng, _p(GENDER_P), n)
    _missing(rng, gender, 0.08, 0.005)
    plan = _draw(rng, _p(PLAN_P), n)
    _missing(rng, plan, 0.02, 0.0)
    created = _moments(rng, _recent(rng, n, as_of, CREATED_DAYS), as_of)
    return _Profiles(start, n, country, city, tags, age, gender, subscribed, birthday,
                     has_birthday, created, plan)


def _keyword_column(name: str, values: Sequence[str], codes: np.ndarray) -> np.ndarray:
    """',"name":"value"' per row ("" when omitted, null when null)."""
    table = _table([f',"{name}":"{v}"' for v in values], f',"{name}":null')
    return table[codes]


def _tags_column(masks: np.ndarray) -> np.ndarray:
    """',"tags":[...]' per row, omitted for no tags."""
    def fmt(mask: int) -> str:
        if not mask:
            return ""
        names = ",".join(f'"{t}"' for i, t in enumerate(TAGS) if mask >> i & 1)
        return f',"tags":[{names}]'
    return _by_unique(masks, fmt)


def _birthday_column(p: _Profiles) -> np.ndarray:
    """',"birthday":"YYYY-MM-DD"' per row, or omitted / null."""
    column = _by_unique(p.birthday, lambda day: f',"birthday":"{np.datetime64(day, "D")}"')
    column[p.has_birthday == -1] = ""
    column[p.has_birthday == -2] = ',"birthday":null'
    return column


def _profile_text(p: _Profiles, points: np.ndarray, ltv_cents: np.ndarray, days: _Days) -> str:
    """The JSON lines of one chunk of profiles."""
    city_names, _, _ = _cities()
    ages = _table([f',"age":{a}' for a in range(131)], ',"age":null')
    flags = _table([',"subscribed":false', ',"subscribed":true'])
    return _rows(p.n, [
        [f'{{"id":"u{i}"' for i in range(p.start, p.start + p.n)],
        _keyword_column("country", COUNTRIES, p.country),
        _keyword_column("city", city_names, p.city),
        _tags_column(p.tags),
        ages[p.age],
        _keyword_column("gender", GENDERS, p.gender),
        flags[p.subscribed],
        _birthday_column(p),
        ',"created_at":"',
        days.text[p.created // DAY - days.first],
        _time_of_day()[p.created % DAY],
        _keyword_column("plan", PLANS, p.plan),
        _by_unique(points, lambda v: f',"points":{v}'),
        [f',"ltv":{t}}}\n' for t in _money(ltv_cents)],
    ])


# --------------------------------------------------------------------------- events


@dataclass
class _Events:
    """One chunk's events as columns, sorted by time."""

    owner: np.ndarray  # profile index within the chunk
    kind: np.ndarray  # index into EVENT_NAMES
    ts: np.ndarray  # epoch seconds
    code: np.ndarray  # index into _EventCatalog.tails


def _spread(rng: np.random.Generator, total_mean: float, weight: np.ndarray) -> np.ndarray:
    """Row counts per profile: a Poisson total split in proportion to weight."""
    total = rng.poisson(total_mean) if total_mean > 0 else 0
    return rng.multinomial(total, weight / weight.sum())


def _activity(rng: np.random.Generator, n: int) -> np.ndarray:
    """Power-law activity weights: most profiles quiet, a few extremely busy."""
    return np.minimum(rng.pareto(1.5, n) + 0.02, 1000.0)


def _event_kinds(rng: np.random.Generator, p: _Profiles, owner: np.ndarray) -> np.ndarray:
    """An event type per row; app opens need the app_user tag, emails a subscription."""
    kind = _draw(rng, _p(list(EVENT_WEIGHTS.values())), len(owner))
    app_user = (p.tags >> TAGS.index("app_user") & 1).astype(bool)[owner]
    kind[(kind == EV["app_open"]) & ~app_user] = EV["page_view"]
    mailable = (p.subscribed == 1)[owner]
    emails = (kind == EV["email_opened"]) | (kind == EV["email_clicked"])
    kind[emails & ~mailable] = EV["page_view"]
    return kind


def _event_values(rng: np.random.Generator, kind: np.ndarray, month: np.ndarray) -> np.ndarray:
    """A property-value code per event, drawn with its type's odds in the event's month."""
    cat = _event_catalog()
    code = np.empty(len(kind), dtype=np.int64)
    u = rng.random(len(kind))
    for t, cdf in enumerate(cat.cdfs):
        rows = np.flatnonzero(kind == t)
        if np.all(cdf == cdf[0]):
            code[rows] = np.searchsorted(cdf[0], u[rows], side="right")
        else:
            for m in range(12):
                sub = rows[month[rows] == m]
                code[sub] = np.searchsorted(cdf[m], u[sub], side="right")
        code[rows] += cat.offset[t]
    return code


def _events(rng: np.random.Generator, p: _Profiles, as_of: int, mean: float,
            activity: np.ndarray, days: _Days) -> _Events:
    """The events of one chunk of profiles."""
    lo = np.maximum(p.created, as_of - EVENT_DAYS * DAY)
    active = (as_of - lo) / (EVENT_DAYS * DAY)
    counts = _spread(rng, mean * p.n, activity * active + 1e-12)
    owner = np.repeat(np.arange(p.n), counts)
    kind = _event_kinds(rng, p, owner)
    ts = _moments(rng, lo[owner], as_of)
    future = (kind == EV["points_accrued"]) & (rng.random(len(kind)) < FUTURE_POINTS_SHARE)
    ts[future] = as_of + 1 + rng.integers(0, FUTURE_DAYS * DAY, int(future.sum()))
    code = _event_values(rng, kind, days.month[ts // DAY - days.first])
    order = np.argsort(ts, kind="stable")
    return _Events(owner[order], kind[order], ts[order], code[order])


def _event_text(e: _Events, heads: np.ndarray, days: _Days, rows: slice) -> str:
    """The JSON lines of a slice of one chunk's events."""
    cat = _event_catalog()
    ts = e.ts[rows]
    return _rows(len(ts), [heads[e.owner[rows]], cat.mids[e.kind[rows]],
                           days.text[ts // DAY - days.first], _time_of_day()[ts % DAY],
                           cat.tails[e.code[rows]]])


def _points(e: _Events, n: int, as_of: int) -> np.ndarray:
    """Each profile's points: its points_accrued events up to as_of."""
    earned = _event_catalog().points[e.code] * (e.ts <= as_of)
    return np.bincount(e.owner, weights=earned, minlength=n).astype(np.int64)


# --------------------------------------------------------------------------- orders


@dataclass
class _Orders:
    """One chunk's orders (sorted by time) and their items."""

    owner: np.ndarray
    ts: np.ndarray
    head: np.ndarray  # index into _order_heads()
    status: np.ndarray
    cents: np.ndarray  # order amount
    n_items: np.ndarray
    item: np.ndarray  # flat, in order: index into _Catalog.items[.]


@lru_cache(maxsize=1)
def _order_heads() -> np.ndarray:
    """',"status":...,"amount":' for every status x channel x region x source."""
    return np.array([f',"status":"{s}","channel":"{c}","region":"{r}","source":"{o}","amount":'
                     for s in STATUSES for c in CHANNELS for r in REGIONS for o in SOURCES],
                    dtype=object)


def _statuses(rng: np.random.Generator, age: np.ndarray) -> np.ndarray:
    """Order status by order age: recent orders pending or paid, old ones delivered."""
    bucket = np.digitize(age, [3 * DAY, 14 * DAY])
    cdf = _cdf(np.array(STATUS_P))[bucket]
    return (rng.random(len(age))[:, None] >= cdf).sum(axis=1)


def _regions(rng: np.random.Generator, country: np.ndarray) -> np.ndarray:
    """The region of the buyer's country; random when unknown, or 3% of the time."""
    by_country = np.array([REGIONS.index(COUNTRY_REGION[c]) for c in COUNTRIES] + [0])
    region = by_country[country]
    wild = (country < 0) | (rng.random(len(country)) < 0.03)
    region[wild] = rng.integers(0, len(REGIONS), int(wild.sum()))
    return region


def _items(rng: np.random.Generator, total: int,
           starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat item codes (the first of an order has no leading comma) and each line's cents."""
    cat = _catalog()
    sku = _draw(rng, cat.popularity, total)
    discount = _draw(rng, _p(DISCOUNT_P), total)
    qty = _draw(rng, _p(QTY_P), total) + 1
    first = np.zeros(total, dtype=np.int64)
    first[starts] = 1
    code = ((sku * len(DISCOUNTS) + discount) * 5 + qty - 1) + (1 - first) * cat.items.shape[1]
    return code, qty * cat.unit_cents[sku, discount]


def _orders(rng: np.random.Generator, p: _Profiles, as_of: int, mean: float,
            activity: np.ndarray) -> _Orders:
    """The orders of one chunk of profiles; busy browsers tend to buy more."""
    lo = np.maximum(p.created, as_of - ORDER_DAYS * DAY)
    active = (as_of - lo) / (ORDER_DAYS * DAY)
    weight = activity ** 0.5 * rng.lognormal(0.0, 0.8, p.n) * active + 1e-12
    owner = np.repeat(np.arange(p.n), _spread(rng, mean * p.n, weight))
    ts = _moments(rng, lo[owner], as_of)
    order = np.argsort(ts, kind="stable")
    return _order_rows(rng, p, owner[order], ts[order], as_of)


def _order_rows(rng: np.random.Generator, p: _Profiles, owner: np.ndarray, ts: np.ndarray,
                as_of: int) -> _Orders:
    """Order attributes and items for given owners and times."""
    n = len(owner)
    status = _statuses(rng, as_of - ts)
    channel = _draw(rng, _p(CHANNEL_P), n)
    region = _regions(rng, p.country[owner])
    source = _draw(rng, _p(SOURCE_P), n)
    head = ((status * len(CHANNELS) + channel) * len(REGIONS) + region) * len(SOURCES) + source
    n_items = _draw(rng, _p(ITEMS_P), n) + 1
    starts = (np.cumsum(n_items) - n_items).astype(np.int64)
    item, line_cents = _items(rng, int(n_items.sum()), starts)
    cents = np.add.reduceat(line_cents, starts) if n else np.zeros(0, dtype=np.int64)
    return _Orders(owner, ts, head, status, cents, n_items, item)


def _order_text(o: _Orders, first_id: int, buyers: np.ndarray, days: _Days) -> str:
    """The JSON lines of one chunk's orders; items are spliced in between head and tail."""
    n, width = len(o.ts), 7
    slots = np.cumsum(o.n_items + width + 1) - (o.n_items + width + 1)
    parts = np.empty(int(slots[-1] + o.n_items[-1] + width + 1), dtype=object)
    columns = [
        [f'{{"id":"o{i}","profile":"' for i in range(first_id, first_id + n)],
        buyers[o.owner],
        days.text[o.ts // DAY - days.first],
        _time_of_day()[o.ts % DAY],
        _order_heads()[o.head],
        _money(o.cents),
        f',"currency":"{CURRENCY}","items":[',
    ]
    for j, column in enumerate(columns):
        parts[slots + j] = column
    item_slot = np.repeat(slots + width, o.n_items) + _rank_within(o.n_items)
    parts[item_slot] = _catalog().items.ravel()[o.item]
    parts[slots + width + o.n_items] = "]}\n"
    return "".join(parts.tolist())


def _rank_within(sizes: np.ndarray) -> np.ndarray:
    """0, 1, ... k-1 for each group of the given sizes, concatenated."""
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    return np.arange(int(sizes.sum())) - starts


def _ltv(o: _Orders, n: int) -> np.ndarray:
    """Each profile's lifetime value in cents: its paid and delivered orders."""
    counted = np.isin(o.status, [STATUSES.index(s) for s in LTV_STATUSES])
    return np.bincount(o.owner, weights=o.cents * counted, minlength=n).astype(np.int64)


# --------------------------------------------------------------------------- files


def _open(out: Path, name: str, gzip: bool) -> BinaryIO:
    """Opens name.jsonl[.gz] for writing and removes the other variant (one per dataset)."""
    plain, packed = out / f"{name}.jsonl", out / f"{name}.jsonl.gz"
    (plain if gzip else packed).unlink(missing_ok=True)
    if not gzip:
        return open(plain, "wb")
    # mtime=0 keeps the gzip header, and so the bytes, reproducible.
    return gzip_module.GzipFile(packed, "wb", compresslevel=GZIP_LEVEL, mtime=0)


def _write_schema(out: Path) -> None:
    """schema.json declaring every generated field's type."""
    (out / "schema.json").write_bytes(orjson.dumps(SCHEMA, option=orjson.OPT_INDENT_2) + b"\n")


def _check(profiles: int, seed: int, events_per_profile: float,
           orders_per_profile: float) -> None:
    """Rejects arguments that cannot describe a dataset."""
    if profiles < 0:
        raise ValueError(f"profiles must be >= 0, got {profiles}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if events_per_profile < 0 or orders_per_profile < 0:
        raise ValueError("events_per_profile and orders_per_profile must be >= 0")


def _chunk_size(events_per_profile: float, orders_per_profile: float) -> int:
    """Profiles per chunk, so one chunk's rows (an order counts ~3) stay bounded."""
    rows = max(1.0, events_per_profile + 3 * orders_per_profile)
    return max(1_000, min(CHUNK, int(ROWS_PER_CHUNK // rows)))


def generate(out_dir: str | Path, *, profiles: int, seed: int = 0,
             events_per_profile: float = 10.0, orders_per_profile: float = 2.0,
             as_of: datetime | None = None, gzip: bool = False,
             progress: bool = False) -> dict[str, int]:
    """Writes a synthetic dataset into out_dir and returns its row counts."""
    _check(profiles, seed, events_per_profile, orders_per_profile)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = _epoch_seconds(as_of)
    days = _Days.spanning(now // DAY - CREATED_DAYS - 2, now // DAY + FUTURE_DAYS + 2)
    counts = dict.fromkeys(FILES, 0)
    _write_schema(out)
    handles = {name: _open(out, name, gzip) for name in FILES}
    bar = tqdm(total=profiles, unit="profile", unit_scale=True, file=sys.stderr,
               disable=not progress, desc="gen")
    size = _chunk_size(events_per_profile, orders_per_profile)
    try:
        for number, start in enumerate(range(0, profiles, size)):
            n = min(size, profiles - start)
            rngs = [np.random.default_rng([seed, number, k]) for k in range(3)]
            _write_chunk(handles, counts, rngs, start, n, now, days,
                         events_per_profile, orders_per_profile)
            bar.update(n)
    finally:
        bar.close()
        for handle in handles.values():
            handle.close()
    return counts


def _write_chunk(handles: dict[str, BinaryIO], counts: dict[str, int],
                 rngs: list[np.random.Generator], start: int, n: int, as_of: int, days: _Days,
                 events_per_profile: float, orders_per_profile: float) -> None:
    """Generates and writes one chunk of profiles with their events and orders."""
    p = _profiles(rngs[0], start, n, as_of)
    activity = _activity(rngs[0], n)
    e = _events(rngs[1], p, as_of, events_per_profile, activity, days)
    _write_events(handles["events"], e, start, n, days)
    o = _orders(rngs[2], p, as_of, orders_per_profile, activity)
    _write_orders(handles["orders"], o, counts["orders"], start, n, days)
    text = _profile_text(p, _points(e, n, as_of), _ltv(o, n), days)
    handles["profiles"].write(text.encode())
    counts["profiles"] += n
    counts["events"] += len(e.ts)
    counts["orders"] += len(o.ts)


def _write_events(handle: BinaryIO, e: _Events, start: int, n: int, days: _Days) -> None:
    """Writes one chunk's events, a bounded slice at a time."""
    if not len(e.ts):
        return
    heads = np.array([f'{{"profile":"u{i}","event":"' for i in range(start, start + n)],
                     dtype=object)
    for lo in range(0, len(e.ts), WRITE_ROWS):
        handle.write(_event_text(e, heads, days, slice(lo, lo + WRITE_ROWS)).encode())


def _write_orders(handle: BinaryIO, o: _Orders, first_id: int, start: int, n: int,
                  days: _Days) -> None:
    """Writes one chunk's orders."""
    if not len(o.ts):
        return
    buyers = np.array([f'u{i}","ts":"' for i in range(start, start + n)], dtype=object)
    handle.write(_order_text(o, first_id, buyers, days).encode())

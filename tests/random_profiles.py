"""Random profiles over one small schema, shared by the Describe and Insights tests, and
the nearest-rank quantile both compare against."""

from __future__ import annotations

import math
import random

SCHEMA = {"profiles": {"country": "keyword", "tags": "keywords", "age": "int", "ltv": "float",
                       "since": "date", "vip": "bool"}}


def random_profiles(rng: random.Random, n: int, ltv_decimals: int) -> list[dict]:
    """n profiles u0…, each field present with its own probability; ltv rounded to up to
    `ltv_decimals` decimals."""
    profiles = []
    for i in range(n):
        p: dict = {"id": f"u{i}"}
        if rng.random() < 0.8:
            p["country"] = rng.choice(["DE", "FR", "US", "ES"])
        if rng.random() < 0.7:
            p["tags"] = rng.sample(["vip", "news", "beta"], rng.randint(1, 3))
        if rng.random() < 0.8:
            p["age"] = rng.randint(-5, 90)
        if rng.random() < 0.7:
            p["ltv"] = round(rng.uniform(-10, 500), rng.randint(0, ltv_decimals))
        if rng.random() < 0.6:
            p["since"] = f"2020-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"
        if rng.random() < 0.8:
            p["vip"] = rng.random() < 0.5
        profiles.append(p)
    return profiles


def nearest_rank(values: list, q: float):
    """The value at rank ceil(q * n) (rank 1 for q = 0) of the sorted values."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]

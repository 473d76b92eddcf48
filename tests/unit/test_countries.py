"""Country resolution: the cases the old system got wrong, aliases, codes, US states, false positives."""

from __future__ import annotations

import pycountry
import pytest
from hypothesis import given
from hypothesis import strategies as st

from connectors.countries import UNKNOWN, country_code, normalize, organization_country_code


# The spec's list of what the substring matcher got wrong (CLEANED_BUCKETS.md), with the right answers.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Bucharest, Romania", "RO"),
        ("Lagos, Nigeria", "NG"),
        ("Newark, New Jersey", "US"),
        ("Atlanta, Georgia, United States", "US"),
        ("US", "US"),
        ("UK", "GB"),
        ("South Korea", "KR"),
    ],
)
def test_the_old_systems_wrong_cases(text: str, expected: str) -> None:
    assert country_code(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("USA", "US"),
        ("U.S.A.", "US"),
        ("United States of America", "US"),
        ("united states", "US"),
        ("Great Britain", "GB"),
        ("England", "GB"),
        ("Korea", "KR"),
        ("Republic of Korea", "KR"),
        ("North Korea", "KP"),
        ("Russia", "RU"),
        ("Czech Republic", "CZ"),
        ("Czechia", "CZ"),
        ("The Netherlands", "NL"),
        ("Türkiye", "TR"),
        ("Vietnam", "VN"),
        ("Ivory Coast", "CI"),
        ("Côte d'Ivoire", "CI"),
        ("UAE", "AE"),
        ("Deutschland", "DE"),
    ],
)
def test_common_aliases(text: str, expected: str) -> None:
    assert country_code(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Korea, Republic of", "KR"),  # ISO short name with a comma: not split
        ("Seoul, Korea, Republic of", "KR"),
        ("Congo, The Democratic Republic of the", "CD"),
        ("Kinshasa, Congo, The Democratic Republic of the", "CD"),  # not CG from the "Congo" part alone
        ("Virgin Islands, U.S.", "VI"),  # not US from the "U.S." part alone
        ("Taipei, Taiwan, Province of China", "TW"),
        ("Moscow, Russian Federation", "RU"),
    ],
)
def test_names_containing_commas(text: str, expected: str) -> None:
    assert country_code(text) == expected


def test_every_iso_country_by_name_official_name_and_codes() -> None:
    wrong = []
    for c in pycountry.countries:
        for text in (
            c.name,
            getattr(c, "official_name", None),
            getattr(c, "common_name", None),
            c.alpha_2,
            c.alpha_3,
            c.name.upper(),
        ):
            if text and country_code(text) != c.alpha_2:
                wrong.append((text, country_code(text), c.alpha_2))
    assert wrong == []


def test_every_us_state_name_and_code_is_us() -> None:
    states = [s for s in pycountry.subdivisions.get(country_code="US") if s.type == "State"]
    assert len(states) == 50
    wrong = []
    for s in states:
        short = s.code.split("-")[1]
        for text in (s.name, f"Springfield, {s.name}", f"Springfield, {short}", f"Springfield, {s.name}, USA"):
            if country_code(text) != "US":
                wrong.append((text, country_code(text)))
    # Georgia is the only state name that is also a country's: without a hint of the US it is the country.
    assert wrong == [("Georgia", "GE"), ("Springfield, Georgia", "GE")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Atlanta, Georgia", "US"),  # the city implies the US
        ("Georgia, USA", "US"),
        ("Savannah, GA", "US"),
        ("Tbilisi, Georgia", "GE"),
        ("Georgia", "GE"),
    ],
)
def test_georgia_state_or_country(text: str, expected: str) -> None:
    assert country_code(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("San Francisco, CA", "US"),  # City, ST convention for a code that is also Canada's
        ("Chicago, IL", "US"),
        ("Portland, OR", "US"),
        ("Newark NJ", "US"),
        ("Paris, TN", "US"),  # Paris, Tennessee: the code is read as the state, not Tunisia, nor France
        ("Bengaluru, IN", "IN"),  # a known city agreeing with the country reading
        ("Berlin, DE", "DE"),
        ("Tel Aviv, IL", "IL"),
        ("Toronto, ON", "CA"),
        ("London, Ontario", "CA"),
        ("Mountain View, California, US", "US"),
        ("Bucharest Romania", "RO"),
        ("São Paulo, Brasil", "BR"),
        ("Zürich / Switzerland", "CH"),
        ("Berlin", "DE"),
        ("Remote (Lagos, Nigeria)", "NG"),
    ],
)
def test_free_text_locations(text: str, expected: str) -> None:
    assert country_code(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "nowhere",
        "Remote",
        "Of",
        "in",
        "Of, Trabzon",
        "Worldwide",
        "Earth",
        "Springfield",
        "Indianapolis Metro",
        "Linux Foundation",
        "123",
    ],
)
def test_unknown_and_tiny_tokens_are_xx(text: str) -> None:
    assert country_code(text) == UNKNOWN


def test_codes_inside_words_do_not_match() -> None:
    # Each of these contains a country code or a country name as a substring, never as a whole part.
    for text in ("Indiana Jones Institute", "Spain-ish", "Nigerian Prince Ltd", "Romanian Cultural Club"):
        assert country_code(text) == UNKNOWN, text
    assert country_code("Lagos, Nigeria") != country_code("Niamey, Niger")


def test_none_is_unknown() -> None:
    assert country_code(None) == UNKNOWN


def test_organization_prefers_country_then_location() -> None:
    assert organization_country_code("Romania", "Lagos, Nigeria") == "RO"
    assert organization_country_code("", "Lagos, Nigeria") == "NG"
    assert organization_country_code("not a country", "Newark, New Jersey") == "US"
    assert organization_country_code("", "") == UNKNOWN
    assert organization_country_code(None, None) == UNKNOWN


def test_normalize_is_case_accent_and_punctuation_insensitive() -> None:
    assert normalize("  Côte  D’Ivoire ") == normalize("cote divoire") == "cote divoire"
    assert normalize("U.S.A.") == "u s a"


@given(st.text(max_size=40))
def test_any_text_gives_a_two_letter_code(text: str) -> None:
    code = country_code(text)
    assert code == UNKNOWN or pycountry.countries.get(alpha_2=code) is not None

"""Country resolution: free text (a country field or a location) -> ISO 3166-1 alpha-2, 'XX' when unknown.

Pure and cached; the data is pycountry's (ISO 3166-1 names, official and common names, alpha-2/alpha-3 codes,
ISO 3166-2 subdivisions for the US, Canada and Australia) plus a short list of everyday aliases ("UK",
"USA", "South Korea", "Russia", ...) and a few well-known cities, used only as a last resort.

How a text is read (``country_code``):

1. The whole text, when it is a country name/alias/official name (commas included: "Korea, Republic of"),
   or an alpha-2/alpha-3 code in capitals ("DE", "GBR"; "us"/"uk" are aliases), or a US state /
   Canadian province / Australian state name.
2. Otherwise it is split into parts at ``, / ; |``, parentheses and spaced dashes, and the parts are read
   from the LAST one backwards (the country usually comes last); at each position the longest run of
   up to three consecutive parts is tried first, so "Taipei, Taiwan, Province of China" is Taiwan and
   "Virgin Islands, U.S." is VI, not US. Only whole parts match: "Lagos, Nigeria" is NG (not NE via a
   "Niger" substring), "Newark, New Jersey" is US (not JE), a city called "Of" or the letters "in" inside
   a word never match anything.
3. A code matches only when written in capitals (a town called "In" or "Of" is not a country). A two-letter part
   that is a US state code ("Portland, OR") means US. When it is also a country code ("San Francisco, CA",
   "Atlanta, GA", "Chicago, IL"), the City, ST convention wins (US) unless another part names a known city
   or country that agrees with the country reading ("Bengaluru, IN" is India, "Berlin, DE" is Germany).
4. "Georgia" is both a country and a US state: it is the state when another part implies the US
   ("Atlanta, Georgia", "Savannah, Georgia, United States", "Georgia, USA"), else the country
   ("Tbilisi, Georgia", "Georgia").
5. When no part is a place name, a trailing country/state name inside a part ("Bucharest Romania") and
   then a known city ("Berlin") are tried. Nothing found: 'XX'.

``organization_country_code(country, location)``: the code of ``country``; when that is empty or
unknown, the code of ``location``; 'XX' when neither resolves. (The spec reads the location only when
country is empty; an unreadable country field falling back to the location is a deliberate improvement.)
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

import pycountry

UNKNOWN = "XX"
# Bump when the rules or the data change: cached codes in the warehouse are recomputed.
RESOLVER_VERSION = 1

_ALIASES: dict[str, str] = {
    # United States
    "usa": "US",
    "us": "US",
    "u s": "US",
    "u s a": "US",
    "united states of america": "US",
    "america": "US",
    "the united states": "US",
    "united states": "US",
    "estados unidos": "US",
    # United Kingdom
    "uk": "GB",
    "u k": "GB",
    "great britain": "GB",
    "britain": "GB",
    "england": "GB",
    "scotland": "GB",
    "wales": "GB",
    "northern ireland": "GB",
    "united kingdom of great britain": "GB",
    # Koreas
    "south korea": "KR",
    "korea": "KR",
    "republic of korea": "KR",
    "korea south": "KR",
    "rok": "KR",
    "north korea": "KP",
    "korea north": "KP",
    "dprk": "KP",
    # common names missing from ISO or spelled otherwise
    "russia": "RU",
    "czech republic": "CZ",
    "czechia": "CZ",
    "holland": "NL",
    "the netherlands": "NL",
    "turkey": "TR",
    "turkiye": "TR",
    "vietnam": "VN",
    "viet nam": "VN",
    "iran": "IR",
    "syria": "SY",
    "laos": "LA",
    "moldova": "MD",
    "tanzania": "TZ",
    "venezuela": "VE",
    "bolivia": "BO",
    "macedonia": "MK",
    "north macedonia": "MK",
    "ivory coast": "CI",
    "cote divoire": "CI",
    "swaziland": "SZ",
    "eswatini": "SZ",
    "burma": "MM",
    "cape verde": "CV",
    "palestine": "PS",
    "vatican": "VA",
    "vatican city": "VA",
    "taiwan": "TW",
    "hong kong": "HK",
    "macau": "MO",
    "macao": "MO",
    "uae": "AE",
    "u a e": "AE",
    "emirates": "AE",
    "ksa": "SA",
    "drc": "CD",
    "dr congo": "CD",
    "democratic republic of the congo": "CD",
    "congo kinshasa": "CD",
    "republic of the congo": "CG",
    "congo brazzaville": "CG",
    "brunei": "BN",
    "micronesia": "FM",
    "east timor": "TL",
    "timor leste": "TL",
    "the gambia": "GM",
    "the bahamas": "BS",
    "st lucia": "LC",
    "st kitts and nevis": "KN",
    "st vincent and the grenadines": "VC",
    "deutschland": "DE",
    "espana": "ES",
    "italia": "IT",
    "brasil": "BR",
    "mexico": "MX",
    "suisse": "CH",
    "schweiz": "CH",
    "osterreich": "AT",
    "polska": "PL",
    "nippon": "JP",
    "prc": "CN",
    "mainland china": "CN",
    "peoples republic of china": "CN",
}

# A last resort for locations that name only a city. Kept short; never consulted when a part names a place.
_CITIES: dict[str, str] = {
    "new york": "US",
    "new york city": "US",
    "nyc": "US",
    "san francisco": "US",
    "los angeles": "US",
    "seattle": "US",
    "boston": "US",
    "chicago": "US",
    "austin": "US",
    "atlanta": "US",
    "savannah": "US",
    "alpharetta": "US",
    "marietta": "US",
    "denver": "US",
    "palo alto": "US",
    "mountain view": "US",
    "menlo park": "US",
    "sunnyvale": "US",
    "redmond": "US",
    "raleigh": "US",
    "pittsburgh": "US",
    "philadelphia": "US",
    "san diego": "US",
    "houston": "US",
    "dallas": "US",
    "silicon valley": "US",
    "london": "GB",
    "manchester": "GB",
    "edinburgh": "GB",
    "berlin": "DE",
    "munich": "DE",
    "munchen": "DE",
    "hamburg": "DE",
    "frankfurt": "DE",
    "paris": "FR",
    "amsterdam": "NL",
    "bangalore": "IN",
    "bengaluru": "IN",
    "mumbai": "IN",
    "hyderabad": "IN",
    "pune": "IN",
    "chennai": "IN",
    "new delhi": "IN",
    "beijing": "CN",
    "shanghai": "CN",
    "shenzhen": "CN",
    "hangzhou": "CN",
    "tokyo": "JP",
    "seoul": "KR",
    "bucharest": "RO",
    "lagos": "NG",
    "tbilisi": "GE",
    "batumi": "GE",
    "kutaisi": "GE",
    "tel aviv": "IL",
    "toronto": "CA",
    "vancouver": "CA",
    "montreal": "CA",
    "sydney": "AU",
    "melbourne": "AU",
    "sao paulo": "BR",
    "zurich": "CH",
    "stockholm": "SE",
    "dublin": "IE",
    "madrid": "ES",
    "barcelona": "ES",
    "warsaw": "PL",
    "kyiv": "UA",
    "kiev": "UA",
    "moscow": "RU",
    "istanbul": "TR",
    "nairobi": "KE",
}

_SPLIT = re.compile(r"\s*(?:[,/;|()\[\]]|\s[-\u2013\u2014]\s)\s*")
_CODE = re.compile(r"^[A-Za-z]{2,3}$")


def normalize(text: str) -> str:
    """Case-, accent- and punctuation-insensitive form of a place name."""
    t = unicodedata.normalize("NFKD", text)
    t = "".join(ch for ch in t if not unicodedata.combining(ch)).casefold()
    t = t.replace("&", " and ").replace(".", " ").replace("'", "").replace("\u2019", "")
    t = re.sub(r"[^\w]+", " ", t).strip()
    return re.sub(r"\s+", " ", t)


def _build() -> tuple[dict[str, str], dict[str, str], dict[str, str], dict[str, str], dict[str, str]]:
    """(country names, alpha codes, region names -> country, US state codes, other region codes)."""
    names: dict[str, str] = {}
    codes: dict[str, str] = {}
    for c in pycountry.countries:
        a2 = c.alpha_2
        codes[a2] = a2
        codes[c.alpha_3] = a2
        for attr in ("name", "official_name", "common_name"):
            value = getattr(c, attr, None)
            if value:
                names.setdefault(normalize(value), a2)
                if ", " in value:  # "Korea, Republic of" -> "Republic of Korea"
                    head, _, tail = value.partition(", ")
                    names.setdefault(normalize(f"{tail} {head}"), a2)
    for key, a2 in _ALIASES.items():
        names[normalize(key)] = a2
    regions: dict[str, str] = {}
    us_codes: dict[str, str] = {}
    other_codes: dict[str, str] = {}
    for country, types in (
        ("US", {"State", "District"}),
        ("CA", {"Province", "Territory"}),
        ("AU", {"State", "Territory"}),
    ):
        for s in pycountry.subdivisions.get(country_code=country) or ():
            if s.type not in types:
                continue
            regions.setdefault(normalize(s.name), country)
            short = s.code.split("-", 1)[1]
            if country == "US":
                us_codes[short] = "US"
            elif short not in codes:  # "NL" stays the Netherlands
                other_codes[short] = country
    regions["washington dc"] = regions["dc"] = "US"
    regions["newfoundland"] = "CA"
    return names, codes, regions, us_codes, other_codes


_NAMES, _CODES, _REGIONS, _US_CODES, _REGION_CODES = _build()
# A name that is a country and a US state at once ("Georgia").
_AMBIGUOUS = {k for k, v in _REGIONS.items() if v == "US" and k in _NAMES}


def _name(part: str) -> tuple[str, str] | None:
    """(code, kind) of a place name; kind is 'country', 'region' or 'ambiguous' (country or US state)."""
    key = normalize(part)
    if not key:
        return None
    if key in _AMBIGUOUS:
        return _NAMES[key], "ambiguous"
    if key in _NAMES:
        return _NAMES[key], "country"
    if key in _REGIONS:
        return _REGIONS[key], "region"
    return None


def _code(part: str) -> tuple[str, str] | None:
    """(code, kind) of a capitalised code inside a location; kind 'country', 'region' or 'ambiguous'."""
    if not _CODE.match(part) or not part.isupper():
        return None
    if len(part) == 2 and part in _US_CODES:
        return (_CODES[part], "ambiguous") if part in _CODES else ("US", "region")
    if part in _CODES:
        return _CODES[part], "country"
    if part in _REGION_CODES:
        return _REGION_CODES[part], "region"
    return None


def _implies(parts: list[str], skip: int) -> set[str]:
    """Countries named or implied by the parts other than ``skip`` (names, capital codes, known cities)."""
    found: set[str] = set()
    for i, p in enumerate(parts):
        if i == skip:
            continue
        hit = _name(p) or _code(p)
        if hit is not None and hit[1] != "ambiguous":
            found.add(hit[0])
        city = _CITIES.get(normalize(p))
        if city:
            found.add(city)
    return found


def _read_parts(parts: list[str]) -> str | None:
    for end in range(len(parts) - 1, -1, -1):
        for start in range(max(0, end - 2), end + 1):
            text = ", ".join(parts[start : end + 1])
            hit = _name(text) or (_code(text) if start == end and len(parts) > 1 else None)
            if hit is None:
                continue
            code, kind = hit
            if kind != "ambiguous":
                return code
            others = _implies(parts, end)
            if len(text) == 2:  # a code that is a country's and a US state's: City, ST unless told otherwise
                return code if code in others and "US" not in others else "US"
            return "US" if "US" in others else code
    return None


def _trailing_name(part: str) -> str | None:
    words = part.split()
    if len(words) > 1 and words[-1] in _US_CODES and words[-1] not in _CODES:  # "Newark NJ"
        return "US"
    for k in range(len(words) - 1, 0, -1):
        tail = " ".join(words[-k:])
        if len(normalize(tail)) < 4:
            continue
        hit = _name(tail)
        if hit is not None:
            return "US" if hit[1] == "ambiguous" and "US" in _implies([part], -1) else hit[0]
    return None


@lru_cache(maxsize=1 << 16)
def country_code(text: str | None) -> str:
    """ISO 3166-1 alpha-2 of a country name, alias, code or free-text location; 'XX' when unknown."""
    t = (text or "").strip()
    if not t:
        return UNKNOWN
    whole = _name(t)
    if whole is not None:
        return whole[0]
    if _CODE.match(t) and t.isupper() and t in _CODES:
        return _CODES[t]
    parts = [p for p in _SPLIT.split(t) if p]
    code = _read_parts(parts)
    if code is not None:
        return code
    for part in reversed(parts):
        code = _trailing_name(part)
        if code is not None:
            return code
    for part in reversed(parts):
        city = _CITIES.get(normalize(part))
        if city:
            return city
    return UNKNOWN


def organization_country_code(country: str | None, location: str | None) -> str:
    """The organization's code: from ``country``, else from ``location``; 'XX' when neither resolves."""
    code = country_code(country)
    return code if code != UNKNOWN else country_code(location)

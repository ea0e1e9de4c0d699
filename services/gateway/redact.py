"""Personal data taken out of text before it is stored or logged: e-mail addresses, IBANs (mod-97
checked), payment card numbers (Luhn checked) and phone numbers, in any script around them.

Digits are bounded by lookarounds rather than \\b: in Chinese text a number sits between word
characters ("电话13800138000"), where \\b finds no boundary.
"""

from __future__ import annotations

import re

EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?(?![A-Za-z0-9])")
# 13-19 digits, in groups split by single spaces or dashes.
CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
# A +country code and 7-15 digits, or 9-15 digits without one (an 8-digit order number or date is
# not a phone), in groups split by spaces, dashes, dots or parentheses; never the middle of a longer run.
_GROUPS = r"(?:\(\d{1,4}\)[ .-]?)?\d(?:[ .-]?\d){%d,14}(?![ .-]?\d)"
PHONE = re.compile(r"(?<![A-Za-z0-9+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?%s|%s)" % (_GROUPS % 6, _GROUPS % 8))

MARKS = {"email": "[EMAIL]", "iban": "[IBAN]", "card": "[CARD]", "phone": "[PHONE]"}


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, d in enumerate(reversed(digits)):
        n = int(d) * (2 if i % 2 else 1)
        total += n - 9 if n > 9 else n
    return total % 10 == 0


def iban_ok(iban: str) -> bool:
    compact = iban.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in moved)) % 97 == 1


def redact(text: str) -> str:
    """text with each piece of personal data replaced by its mark ([EMAIL], [IBAN], [CARD], [PHONE])."""
    text = IBAN.sub(lambda m: MARKS["iban"] if iban_ok(m.group()) else m.group(), text)
    text = EMAIL.sub(MARKS["email"], text)
    text = CARD.sub(lambda m: MARKS["card"] if luhn_ok(re.sub(r"\D", "", m.group())) else m.group(), text)
    return PHONE.sub(MARKS["phone"], text)


def redact_value(value):
    """Every string inside a JSON-like value redacted (keys kept)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [redact_value(v) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    return value

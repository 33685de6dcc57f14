"""x-neogate-* request headers: checked the same through a multidict (both roads) and a plain mapping."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.errors import InvalidRequest
from gateway.http.client_headers import check_client_headers

CLASSES = {"interactive", "batch"}
BASE = [("Host", "gw"), ("Authorization", "Bearer k"), ("Content-Type", "application/json")]


def _roads(pairs: list[tuple[str, str]]) -> list[Mapping[str, str]]:
    md = CIMultiDict(pairs)
    return [md, CIMultiDictProxy(md), dict(pairs)]


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("X-Neogate-Timeout", "abc", "x-neogate-timeout"),
        ("x-neogate-timeout", "0", "x-neogate-timeout"),
        ("X-NEOGATE-DEADLINE-S", "-1", "x-neogate-deadline-s"),
        ("x-neogate-deadline-s", "inf", "x-neogate-deadline-s"),
        ("X-Neogate-Slo-Class", "gold", "x-neogate-slo-class"),
    ],
)
def test_a_bad_value_is_refused_in_any_case(name: str, value: str, problem: str) -> None:
    for headers in _roads([*BASE, (name, value)]):
        with pytest.raises(InvalidRequest, match=problem):
            check_client_headers(headers, CLASSES)


def test_good_values_and_echoed_names_pass() -> None:
    pairs = [
        *BASE,
        ("X-Neogate-Timeout", "2.5"),
        ("x-neogate-deadline-s", "0"),
        ("x-neogate-slo-class", "batch"),
        ("x-neogate-backend", "whatever"),  # a response header echoed back: not read
    ]
    for headers in _roads(pairs):
        check_client_headers(headers, CLASSES)


def test_every_copy_of_a_repeated_header_is_checked() -> None:
    md = CIMultiDict([*BASE, ("x-neogate-timeout", "5"), ("X-Neogate-Timeout", "soon")])
    with pytest.raises(InvalidRequest, match="'soon'"):
        check_client_headers(md, CLASSES)

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshtls.pki import PKIError, matches_pattern, parse_spiffe_id, workload_spiffe_id

TD_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.-_"
SEG_CHARS = TD_CHARS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

trust_domains = st.text(TD_CHARS, min_size=1, max_size=60)
segments = st.text(SEG_CHARS, min_size=1, max_size=30).filter(lambda s: s not in (".", ".."))


@given(trust_domains, st.lists(segments, max_size=6))
def test_valid_ids_round_trip(td: str, path: list[str]) -> None:
    text = "spiffe://" + td + "".join("/" + s for s in path)
    parsed = parse_spiffe_id(text)
    assert str(parsed) == text
    assert parsed.trust_domain == td
    assert list(parsed.segments) == path


@pytest.mark.parametrize(
    ("text", "rule"),
    [
        ("http://example.org/a", "must start with 'spiffe://'"),
        ("SPIFFE://example.org/a", "must start with"),
        ("spiffe://", "must not be empty"),
        ("spiffe://Example.org/a", "lowercase"),
        ("spiffe://example.org:8080/a", "port"),
        ("spiffe://user@example.org/a", "userinfo"),
        ("spiffe://example.org/a?x=1", "query"),
        ("spiffe://example.org/a#frag", "fragment"),
        ("spiffe://example.org/", "must not end with '/'"),
        ("spiffe://example.org//a", "empty"),
        ("spiffe://example.org/a/./b", "'.'"),
        ("spiffe://example.org/a/../b", "'..'"),
        ("spiffe://example.org/a b", "may contain only"),
        ("spiffe://example.org/caf\u00e9", "may contain only"),
        ("spiffe://" + "a" * 256 + "/x", "at most 255"),
        ("spiffe://example.org/" + "a" * 2100, "at most 2048"),
    ],
)
def test_invalid_ids_say_which_rule(text: str, rule: str) -> None:
    with pytest.raises(PKIError) as err:
        parse_spiffe_id(text, "spec.spiffeId")
    assert err.value.field == "spec.spiffeId"
    assert rule in str(err.value)


@given(trust_domains, st.lists(segments, min_size=1, max_size=4), st.sampled_from(list("?#@: %/\\")))
def test_ids_with_forbidden_characters_are_refused(td: str, path: list[str], bad: str) -> None:
    text = "spiffe://" + td + "/" + "/".join(path) + bad + "x"
    if bad == "/":  # a '/' only splits a segment; still valid
        parse_spiffe_id(text)
        return
    with pytest.raises(PKIError):
        parse_spiffe_id(text)


def test_workload_id_is_derived_from_namespace_and_service_account() -> None:
    assert str(workload_spiffe_id("cluster.local", "shop", "web")) == "spiffe://cluster.local/ns/shop/sa/web"
    assert workload_spiffe_id("cluster.local", "shop", "web").workload() == ("shop", "web")
    with pytest.raises(PKIError, match="serviceAccountName"):
        workload_spiffe_id("cluster.local", "shop", "..")


def test_allow_list_patterns() -> None:
    sid = "spiffe://td/ns/shop/sa/web"
    assert matches_pattern(sid, sid)
    assert matches_pattern(sid, "spiffe://td/ns/shop/*")
    assert not matches_pattern(sid, "spiffe://td/ns/sho/*")
    assert not matches_pattern(sid, "spiffe://td/ns/shop/sa/we")
    assert not matches_pattern("spiffe://td/ns/shopping/sa/x", "spiffe://td/ns/shop/*")

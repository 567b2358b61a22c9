"""API keys: 256 random bits, a readable prefix, a checksum that catches typos."""

from __future__ import annotations

import hashlib
import string

from hypothesis import given
from hypothesis import strategies as st

from sidecar import keys


def test_keys_have_documented_shape_and_prefix() -> None:
    live, test = keys.generate("live"), keys.generate("test")
    assert live.startswith("tw_live_") and test.startswith("tw_test_")
    assert len(live) == len(test) == keys.KEY_LEN == 57
    assert set(live[8:]) <= set(string.ascii_letters + string.digits)


def test_generated_keys_are_well_formed_and_distinct() -> None:
    batch = {keys.generate() for _ in range(2000)}
    assert len(batch) == 2000
    assert all(keys.is_well_formed(k) for k in batch)


def test_secret_part_carries_at_least_256_bits() -> None:
    # 43 base62 digits cover 2**256; the secret is spread over all of them.
    assert 62**43 >= 2**256
    first_digits = {keys.generate()[8] for _ in range(3000)}
    assert len(first_digits) > 5  # not a constant leading zero


@given(st.integers(min_value=8, max_value=keys.KEY_LEN - 1), st.data())
def test_any_single_character_typo_is_rejected(position: int, data: st.DataObject) -> None:
    key = keys.generate()
    alphabet = string.ascii_letters + string.digits
    replacement = data.draw(st.sampled_from([c for c in alphabet if c != key[position]]))
    typo = key[:position] + replacement + key[position + 1 :]
    assert not keys.is_well_formed(typo)


def test_truncated_padded_or_foreign_keys_are_rejected() -> None:
    key = keys.generate()
    assert not keys.is_well_formed(key[:-1])
    assert not keys.is_well_formed(key + "x")
    assert not keys.is_well_formed("tw_prod_" + key[8:])
    assert not keys.is_well_formed("sk_live_" + key[8:])
    assert not keys.is_well_formed("")
    assert not keys.is_well_formed(key[:-1] + "é")


def test_only_a_sha256_is_stored_and_the_id_does_not_reveal_the_key() -> None:
    key = keys.generate()
    hashed = keys.key_hash(key)
    assert hashed == hashlib.sha256(key.encode()).hexdigest()
    assert key not in hashed
    key_id = keys.key_id(hashed)
    assert key_id.startswith("key_") and key_id[4:] == hashed[:16]
    assert key[8:24] not in key_id

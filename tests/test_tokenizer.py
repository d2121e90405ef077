"""The byte tokenizer: any ids round-trip through text, so an answer sent back as text (a chat's
earlier turn) gives back its tokens."""

import random

import pytest

from dualpath.engine.tokenizer import ByteTokenizer


def test_any_token_ids_round_trip_through_text_that_any_json_encoder_accepts():
    tok, rng = ByteTokenizer(512), random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(512) for _ in range(rng.randrange(1, 60))]
        text = tok.decode(ids)
        text.encode("utf-8")  # no lone surrogates: strict encoders (httpx, the openai client) send it
        assert tok.encode(text) == ids


def test_text_encodes_to_its_utf8_bytes_and_a_lone_high_surrogate_is_refused():
    tok = ByteTokenizer(512)
    assert tok.encode("héllo") == list("héllo".encode())
    with pytest.raises(UnicodeError):
        tok.encode("\ud800")  # not a byte the tokenizer could have produced

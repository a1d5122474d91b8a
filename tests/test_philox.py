"""Philox4x32-10 of csrc/philox.h: Random123's known answers, and a pure-Python Philox.

The pure-Python generator here is written from the algorithm (Salmon et al., SC 2011); the
LTG tests reuse it to check the counter layout of ``pf_kernels.ltg_sample`` independently.
"""

import random

import pytest

M0, M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # key increments
MASK = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Pure-Python Philox4x32-10: counter (4 uint32), key (2 uint32) -> 4 uint32."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
        p0, p1 = M0 * c0, M1 * c2  # 64-bit products
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK, (p0 >> 32) ^ c3 ^ k1, p0 & MASK
    return c0, c1, c2, c3


# Random123 kat_vectors for philox4x32_10.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK, MASK, MASK, MASK), (MASK, MASK), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.fixture(scope="module")
def ext():
    from pf_kernels.ltg import load_extension

    return load_extension()


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers_compiled(ext, counter, key, expected):
    assert tuple(ext.philox4x32_10(list(counter), list(key))) == expected


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answers_python(counter, key, expected):
    assert philox4x32_10(counter, key) == expected


def test_compiled_matches_python_on_random_inputs(ext):
    rng = random.Random(1234)
    for _ in range(200):
        counter = [rng.getrandbits(32) for _ in range(4)]
        key = [rng.getrandbits(32) for _ in range(2)]
        assert tuple(ext.philox4x32_10(counter, key)) == philox4x32_10(counter, key)


def test_binding_rejects_out_of_range_words(ext):
    with pytest.raises(TypeError):
        ext.philox4x32_10([1 << 32, 0, 0, 0], [0, 0])
    with pytest.raises(TypeError):
        ext.philox4x32_10([0, 0, 0], [0, 0])

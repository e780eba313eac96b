"""
Proof of work on registration: a relay under load asks each registration for some CPU time.

The idea is Tor's onion-service proof-of-work defence: free while the relay is quiet, a cost that
rises with the load while it is not, so a flood of registrations from free identities costs its
sender far more than one registration costs a user. The relay announces a difficulty in bits with a
challenge; the tunnel finds a solution, L{SOLUTION_LENGTH} bytes, such that
C{sha256(POW_DOMAIN || nonce || solution)} starts with at least that many zero bits, and sends it with
its registration. Finding one takes about C{2 ** bits} hashes; checking it takes one, a microsecond.

The nonce is the registration challenge's: single use and short lived, so a solution cannot be
reused for another registration, and it is found after the challenge was issued.

This module is pure: the relay's difficulty policy is L{portal.relay.difficulty}, the refusals are
in L{portal.trust.challenge}.
"""

from __future__ import annotations

import hashlib
import struct

#: Domain separation prefix of the hashed input.
POW_DOMAIN = b"portal-pow-v1\0"
#: Length of a solution in bytes.
SOLUTION_LENGTH = 8
#: The most bits a relay may ask for (about 4 * 10 ** 9 hashes): anything above is a protocol error.
MAX_BITS = 32


def leadingZeroBits(digest: bytes) -> int:
    """
    Count the zero bits at the start of C{digest}.

    @param digest: Bytes, most significant bit first.
    @return: The number of leading zero bits (C{8 * len(digest)} for all zeros).
    """
    value = int.from_bytes(digest, "big")
    return len(digest) * 8 - value.bit_length()


def solutionBits(nonce: bytes, solution: bytes) -> int:
    """
    The work a solution proves for a nonce.

    @param nonce: The challenge nonce.
    @param solution: The candidate solution.
    @return: The leading zero bits of its hash, or -1 if C{solution} is not L{SOLUTION_LENGTH}
        bytes long (no length is accepted in place of work).
    """
    if len(solution) != SOLUTION_LENGTH:
        return -1
    return leadingZeroBits(hashlib.sha256(POW_DOMAIN + nonce + solution).digest())


def solve(nonce: bytes, bits: int, start: int = 0) -> bytes:
    """
    Find a solution with at least C{bits} leading zero bits for C{nonce}, trying counters from
    C{start} upwards; expect about C{2 ** bits} tries.

    @param nonce: The challenge nonce.
    @param bits: The difficulty, 0 to L{MAX_BITS}.
    @param start: The first counter tried (several solvers may search disjoint ranges).
    @return: The solution, L{SOLUTION_LENGTH} bytes.
    @raise ValueError: If C{bits} is out of range.
    """
    if not 0 <= bits <= MAX_BITS:
        raise ValueError(f"proof-of-work difficulty must be 0 to {MAX_BITS} bits, not {bits}")
    pack = struct.Struct(">Q").pack
    if bits == 0:
        return pack(start)
    copy = hashlib.sha256(POW_DOMAIN + nonce).copy
    # A digest meets the difficulty when it is below this bound; 32-byte strings compare as numbers.
    bound = (1 << (256 - bits)).to_bytes(32, "big")
    counter = start
    while True:
        candidate = copy()
        candidate.update(pack(counter))
        if candidate.digest() < bound:
            return pack(counter)
        counter += 1

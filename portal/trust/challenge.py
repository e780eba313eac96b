"""
Registration challenges: proof that a tunnel holds the key it registers names for.

The relay issues a random, single-use, short-lived nonce for a set of names.  The tunnel signs
L{registrationMessage}, which binds the nonce to the relay's identity, the names and the tunnel's
public key, so a signature cannot be replayed, moved to another relay, or reused for other names.

A hop through a relay is asked for the same way, with a challenge of purpose C{"hop"} and a signature
over L{hopMessage}, which binds the nonce to the relay's identity, the destination and the tunnel's
public key. The two messages start with different domain strings, so a signature made for one is never
valid for the other.
"""

from __future__ import annotations

import secrets
import struct
from collections import OrderedDict
from typing import Sequence

import attrs
from twisted.internet.interfaces import IReactorTime

from portal.trust.identity import Identity, verifySignature
from portal.trust.proofofwork import MAX_BITS, solutionBits

#: Seconds a challenge stays redeemable after it is issued.
CHALLENGE_TTL: float = 30.0

#: Number of random bytes in a challenge nonce.
NONCE_LENGTH = 32

_DOMAIN = b"portal-register-v1\0"
_HOP_DOMAIN = b"portal-hop-v1\0"

#: What a challenge may be redeemed for (see L{portal.wire.control.Challenge}).
PURPOSE_REGISTER = "register"
PURPOSE_HOP = "hop"


class ChallengeError(Exception):
    """
    A registration was refused; C{str()} of the exception is a reason the tunnel user can act on.
    """


class UnknownChallenge(ChallengeError):
    """
    The challenge was never issued by this relay, or has already been used.
    """


class ExpiredChallenge(ChallengeError):
    """
    The challenge was redeemed after its lifetime ended.
    """


class WorkRequired(ChallengeError):
    """
    The challenge asked for a proof of work (L{portal.trust.proofofwork}) and the registration came
    without one.

    @ivar bits: The difficulty the challenge asked for.
    """

    def __init__(self, message: str, bits: int) -> None:
        """
        @param message: What the tunnel is told.
        @param bits: The difficulty the challenge asked for.
        """
        super().__init__(message)
        self.bits = bits


class WorkInsufficient(ChallengeError):
    """
    The registration's proof of work does not meet the challenge's difficulty: it is malformed,
    was found for another nonce, or for a lower difficulty.
    """


class ChallengeMismatch(ChallengeError):
    """
    The registration names differ from the names the challenge was issued for.
    """


class BadSignature(ChallengeError):
    """
    The signature does not verify: it was made for another relay, another challenge or other names,
    or by another key than the one presented.
    """


def _checkNames(names: Sequence[str]) -> tuple[str, ...]:
    """
    Put a collection of names in canonical order.

    @param names: The names.
    @return: The names, sorted.
    @raise TypeError: If C{names} is a single string rather than a sequence of names.
    """
    if isinstance(names, (str, bytes)):
        raise TypeError("names must be a sequence of names, not a single string")
    return tuple(sorted(names))


def _field(value: bytes) -> bytes:
    """
    Length-prefix one field of a signed message.

    @param value: The field's bytes.
    @return: A 4-byte big-endian length followed by C{value}.
    """
    return struct.pack("!I", len(value)) + value


def registrationMessage(
    relayId: str, nonce: bytes, names: Sequence[str], publicKey: bytes
) -> bytes:
    """
    Encode what a tunnel signs to register names.

    The encoding is C{b"portal-register-v1\\0"} followed by four length-prefixed fields (4-byte
    big-endian length): the relay id (UTF-8), the nonce, the names, and the public key.  The names
    field is the sorted names, each itself length-prefixed and UTF-8 encoded, so no two different
    inputs give the same message.

    @param relayId: The identity id of the relay that issued the challenge.
    @param nonce: The challenge nonce.
    @param names: The names being registered, in any order.
    @param publicKey: The registering tunnel's compressed public key.
    @return: The message to sign.
    """
    encodedNames = b"".join(_field(name.encode("utf-8")) for name in _checkNames(names))
    return (
        _DOMAIN
        + _field(relayId.encode("utf-8"))
        + _field(nonce)
        + _field(encodedNames)
        + _field(publicKey)
    )


def signRegistration(identity: Identity, relayId: str, nonce: bytes, names: Sequence[str]) -> bytes:
    """
    Answer a registration challenge.

    @param identity: The tunnel's identity.
    @param relayId: The identity id of the relay that issued the challenge.
    @param nonce: The challenge nonce.
    @param names: The names being registered.
    @return: A signature over L{registrationMessage} with C{identity}'s public key.
    """
    return identity.sign(registrationMessage(relayId, nonce, names, identity.publicKey))


def hopMessage(relayId: str, nonce: bytes, host: str, port: int, publicKey: bytes) -> bytes:
    """
    Encode what a tunnel signs to ask a relay for a hop to C{host}:C{port}.

    The encoding is C{b"portal-hop-v1\\0"} followed by five length-prefixed fields (4-byte big-endian
    length): the relay id (UTF-8), the nonce, the destination host (UTF-8, as sent in
    L{portal.wire.control.Hop}), the destination port (2 bytes, big-endian), and the public key.

    @param relayId: The identity id of the relay asked to forward (it issued the challenge).
    @param nonce: The challenge nonce.
    @param host: The destination host.
    @param port: The destination port.
    @param publicKey: The tunnel's compressed public key.
    @return: The message to sign.
    """
    return (
        _HOP_DOMAIN
        + _field(relayId.encode("utf-8"))
        + _field(nonce)
        + _field(host.encode("utf-8"))
        + _field(struct.pack("!H", port))
        + _field(publicKey)
    )


def signHop(identity: Identity, relayId: str, nonce: bytes, host: str, port: int) -> bytes:
    """
    Answer a hop challenge.

    @param identity: The tunnel's identity.
    @param relayId: The identity id of the relay asked to forward.
    @param nonce: The challenge nonce.
    @param host: The destination host.
    @param port: The destination port.
    @return: A signature over L{hopMessage} with C{identity}'s key.
    """
    return identity.sign(hopMessage(relayId, nonce, host, port, identity.publicKey))


@attrs.frozen
class _Outstanding:
    """
    A challenge that has been issued and not yet redeemed.

    @ivar names: The sorted names it was issued for.
    @ivar expiresAt: The clock time after which it may no longer be redeemed.
    @ivar purpose: L{PURPOSE_REGISTER} or L{PURPOSE_HOP}.
    @ivar work: The proof-of-work difficulty in bits its registration must meet (0: none).
    """

    names: tuple[str, ...]
    expiresAt: float
    purpose: str = PURPOSE_REGISTER
    work: int = 0


class ChallengeIssuer:
    """
    Issue and redeem a relay's registration challenges.

    Outstanding challenges are kept in issue order, which (with a fixed lifetime) is also expiry
    order, so pruning and dropping the oldest are cheap.
    """

    def __init__(
        self,
        relayId: str,
        clock: IReactorTime,
        ttl: float = CHALLENGE_TTL,
        maxOutstanding: int = 10000,
    ) -> None:
        """
        @param relayId: This relay's identity id, which registrations must be signed for.
        @param clock: The source of the current time.
        @param ttl: Seconds a challenge stays redeemable.
        @param maxOutstanding: Most challenges remembered at once; issuing more forgets the oldest.
        """
        if maxOutstanding < 1:
            raise ValueError("maxOutstanding must be at least 1")
        self.relayId = relayId
        self.ttl = ttl
        self.maxOutstanding = maxOutstanding
        self._clock = clock
        self._outstanding: OrderedDict[bytes, _Outstanding] = OrderedDict()

    def __len__(self) -> int:
        """
        Count the challenges issued and not yet redeemed, including expired ones not yet pruned.

        @return: The number of remembered challenges.
        """
        return len(self._outstanding)

    def _prune(self, now: float) -> None:
        """
        Forget challenges that have expired.

        @param now: The current time.
        """
        while self._outstanding:
            oldest = next(iter(self._outstanding.values()))
            if now <= oldest.expiresAt:
                break
            self._outstanding.popitem(last=False)

    def issue(self, names: Sequence[str], purpose: str = PURPOSE_REGISTER, work: int = 0) -> bytes:
        """
        Issue a challenge for registering C{names}, or for a hop.

        @param names: The names the tunnel asks for (none for a hop).
        @param purpose: L{PURPOSE_REGISTER} or L{PURPOSE_HOP}: what the challenge can be redeemed for.
        @param work: The proof-of-work difficulty in bits the registration must meet (0: none).
        @return: A fresh 32-byte random nonce.
        @raise ValueError: If C{work} is outside 0 to L{MAX_BITS}.
        """
        if not 0 <= work <= MAX_BITS:
            raise ValueError(f"proof-of-work difficulty must be 0 to {MAX_BITS} bits, not {work}")
        sortedNames = _checkNames(names)
        now = self._clock.seconds()
        self._prune(now)
        while len(self._outstanding) >= self.maxOutstanding:
            self._outstanding.popitem(last=False)
        nonce = secrets.token_bytes(NONCE_LENGTH)
        self._outstanding[nonce] = _Outstanding(sortedNames, now + self.ttl, purpose, work)
        return nonce

    def _take(self, nonce: bytes, purpose: str) -> _Outstanding:
        """
        Use up an outstanding challenge of C{purpose}.

        @raise UnknownChallenge: If the nonce was never issued here, was already redeemed, or was
            forgotten to make room for newer ones.
        @raise ExpiredChallenge: If the challenge's lifetime has ended.
        @raise ChallengeMismatch: If the challenge was issued for another purpose.
        """
        outstanding = self._outstanding.pop(nonce, None)
        if outstanding is None:
            raise UnknownChallenge(
                "the challenge is unknown to this relay or was already used; "
                "request a new challenge and sign that"
            )
        if self._clock.seconds() > outstanding.expiresAt:
            raise ExpiredChallenge(
                f"the challenge expired (challenges are valid for {self.ttl:g} "
                f"seconds); request a new challenge and answer it promptly"
            )
        if outstanding.purpose != purpose:
            raise ChallengeMismatch(
                f"the challenge was issued for a {outstanding.purpose}, not a {purpose}; "
                f"request a challenge for what you ask"
            )
        return outstanding

    def redeemHop(
        self, nonce: bytes, host: str, port: int, publicKey: bytes, signature: bytes
    ) -> None:
        """
        Check a signed answer to a hop challenge (see L{hopMessage}).

        The challenge is used up by this call whether or not the answer is accepted.

        @param nonce: The nonce from L{issue} with purpose L{PURPOSE_HOP}.
        @param host: The destination host, as the tunnel asked for it.
        @param port: The destination port.
        @param publicKey: The tunnel's compressed public key.
        @param signature: The tunnel's signature, see L{signHop}.
        @raise UnknownChallenge: If the nonce is unknown or already used.
        @raise ExpiredChallenge: If the challenge's lifetime has ended.
        @raise ChallengeMismatch: If the challenge was issued for a registration.
        @raise BadSignature: If C{signature} is not C{publicKey}'s signature of this relay's hop
            message for this destination.
        """
        self._take(nonce, PURPOSE_HOP)
        if not verifySignature(
            publicKey, signature, hopMessage(self.relayId, nonce, host, port, publicKey)
        ):
            raise BadSignature(
                f"the hop signature is not valid for the presented public key, this relay "
                f"(identity {self.relayId}), the challenge and the destination {host}:{port}"
            )

    def redeem(
        self,
        nonce: bytes,
        names: Sequence[str],
        publicKey: bytes,
        signature: bytes,
        solution: bytes | None = None,
    ) -> None:
        """
        Check a signed answer to a challenge, and its proof of work if the challenge asked for one.

        The challenge is used up by this call whether or not the answer is accepted. The proof of
        work (one hash) is checked before the signature (far slower), so a flood of registrations
        without the work costs the relay little.

        @param nonce: The nonce from L{issue}.
        @param names: The names being registered.
        @param publicKey: The compressed public key the tunnel registers with.
        @param signature: The tunnel's signature, see L{signRegistration}.
        @param solution: The proof of work (L{portal.trust.proofofwork.solve}), or L{None}.
        @raise UnknownChallenge: If the nonce was never issued here, was already redeemed, or was
            forgotten to make room for newer ones.
        @raise ExpiredChallenge: If the challenge's lifetime has ended.
        @raise ChallengeMismatch: If C{names} are not the names the challenge was issued for.
        @raise WorkRequired: If the challenge asked for a proof of work and none came.
        @raise WorkInsufficient: If the proof of work does not meet the challenge's difficulty.
        @raise BadSignature: If C{signature} is not C{publicKey}'s signature of this relay's
            registration message.
        """
        sortedNames = _checkNames(names)
        outstanding = self._take(nonce, PURPOSE_REGISTER)
        if sortedNames != outstanding.names:
            raise ChallengeMismatch(
                f"the registration challenge was issued for names {list(outstanding.names)} "
                f"but the registration asks for {list(sortedNames)}; request a challenge for "
                f"the names you register"
            )
        if outstanding.work:
            if solution is None:
                raise WorkRequired(
                    f"this relay is busy and asks for a proof of work of {outstanding.work} bits "
                    f"with each registration",
                    outstanding.work,
                )
            proved = solutionBits(nonce, solution)
            if proved < outstanding.work:
                raise WorkInsufficient(
                    f"the proof of work proves {max(proved, 0)} bits for this challenge where "
                    f"{outstanding.work} are asked for; solve the challenge this relay issued"
                    if proved >= 0
                    else "the proof of work is malformed (it must be 8 bytes)"
                )
        message = registrationMessage(self.relayId, nonce, sortedNames, publicKey)
        if not verifySignature(publicKey, signature, message):
            raise BadSignature(
                "the registration signature is not valid for the presented public key, this "
                f"relay (identity {self.relayId}) and the challenge; sign the challenge this "
                "relay issued with the key you present"
            )

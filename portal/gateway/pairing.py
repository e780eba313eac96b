"""
Pairing codes: what the owner reads off C{portal pair} and types on the device to pair.

A code is 8 random characters of Crockford's base32 (40 bits), shown as C{XXXX-XXXX}.  Codes live
only in the running tunnel's memory; each may be redeemed once, until it expires (10 minutes by
default).  Wrong attempts are limited per visitor address and in total, so guessing a code is
hopeless: with the defaults at most 30 guesses a minute reach the codes, against 2**40 values.
"""

from __future__ import annotations

import ipaddress
import math
import secrets
from collections import OrderedDict, deque

import attrs
from twisted.internet.interfaces import IReactorTime

#: Seconds a pairing code may be redeemed after it is issued.
CODE_TTL = 600.0

#: Most codes outstanding at once; issuing another forgets the oldest.
MAX_OUTSTANDING_CODES = 16

#: Wrong attempts allowed per visitor address (an IPv6 visitor's /64) in L{ATTEMPT_WINDOW}.
ATTEMPTS_PER_ADDRESS = 5

#: Wrong attempts allowed from all visitors together in L{ATTEMPT_WINDOW}.
ATTEMPTS_TOTAL = 30

#: Seconds over which wrong attempts are counted.
ATTEMPT_WINDOW = 60.0

#: Characters of a code: Crockford's base32 (no I, L, O or U).
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

#: Characters in a code, not counting the dash.
CODE_LENGTH = 8

#: What a typed code's characters are read as: case is ignored, and the letters Crockford's
#: alphabet leaves out are read as the digits they look like.
_READ_AS = str.maketrans("ILO", "110", "- \t")


class PairingRefused(Exception):
    """
    A pairing attempt was refused; the message says why, for the person pairing.
    """


class WrongCode(PairingRefused):
    """
    The code is not one this tunnel issued, was already used, or has expired.
    """


class TooManyAttempts(PairingRefused):
    """
    Too many wrong codes came recently from this address, or from everyone.

    @ivar retryAfter: Seconds until another attempt will be considered.
    """

    def __init__(self, message: str, retryAfter: float) -> None:
        super().__init__(message)
        self.retryAfter = retryAfter


@attrs.frozen
class IssuedCode:
    """
    A pairing code handed to the owner.

    @ivar code: The code as shown, C{XXXX-XXXX}.
    @ivar expiresAt: When it stops being accepted (clock seconds).
    @ivar name: The name the owner gave the terminal to be paired with it, or L{None} to let the
        device propose one.
    """

    code: str
    expiresAt: float
    name: str | None = None


def normalizeCode(typed: str) -> str:
    """
    Read a code as a person typed it.

    @param typed: The code, in any case, with or without its dash.
    @return: Its 8 characters in canonical form (upper case, no dash), or whatever is left of
        C{typed} when it is not a code (which then matches no issued code).
    """
    return typed.upper().translate(_READ_AS)


def formatCode(code: str) -> str:
    """
    @param code: A canonical code, see L{normalizeCode}.
    @return: It as shown to people, C{XXXX-XXXX}.
    """
    return f"{code[:4]}-{code[4:]}"


def addressKey(host: str) -> str:
    """
    Which visitors' wrong attempts are counted together: one IPv4 address, or one IPv6 /64 (a
    single host often holds a whole /64).

    @param host: The visitor's address as the gateway gives it.
    @return: The key its attempts are counted under.
    """
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class AttemptLimiter:
    """
    Counts wrong pairing attempts in a sliding window, per visitor address and in total.

    Only attempts within the window are remembered, and the total is capped, so the memory used is
    bounded by L{total} entries whatever visitors do.
    """

    def __init__(
        self,
        clock: IReactorTime,
        perAddress: int = ATTEMPTS_PER_ADDRESS,
        total: int = ATTEMPTS_TOTAL,
        window: float = ATTEMPT_WINDOW,
        noun: str = "pairing codes",
    ) -> None:
        """
        @param clock: The source of the current time.
        @param perAddress: Wrong attempts allowed per address in C{window}.
        @param total: Wrong attempts allowed from everyone in C{window}.
        @param window: Seconds over which attempts are counted.
        @param noun: What is attempted, for the refusal's message (C{"pairing codes"}).
        """
        self._clock = clock
        self._noun = noun
        self.perAddress = perAddress
        self.total = total
        self.window = window
        self._all: deque[tuple[float, str]] = deque()
        self._byAddress: dict[str, deque[float]] = {}

    def _prune(self, now: float) -> None:
        """
        Forget attempts older than the window.
        """
        while self._all and self._all[0][0] <= now - self.window:
            _, key = self._all.popleft()
            times = self._byAddress[key]
            times.popleft()
            if not times:
                del self._byAddress[key]

    def check(self, host: str) -> None:
        """
        Refuse an attempt from C{host} if too many wrong ones came recently.

        @param host: The visitor's address.
        @raise TooManyAttempts: If C{host} (see L{addressKey}) made L{perAddress} wrong attempts,
            or everyone together L{total}, in the last L{window} seconds.
        """
        now = self._clock.seconds()
        self._prune(now)
        times = self._byAddress.get(addressKey(host))
        if times is not None and len(times) >= self.perAddress:
            raise TooManyAttempts(
                f"too many wrong {self._noun} from your address; wait a minute and try again",
                self._retryAfter(times[-self.perAddress], now),
            )
        if len(self._all) >= self.total:
            raise TooManyAttempts(
                f"too many wrong {self._noun} were tried recently; wait a minute and try again",
                self._retryAfter(self._all[-self.total][0], now),
            )

    def _retryAfter(self, oldestCounted: float, now: float) -> float:
        """
        @return: Whole seconds until the attempt at C{oldestCounted} leaves the window.
        """
        return float(max(1, math.ceil(oldestCounted + self.window - now)))

    def failed(self, host: str) -> None:
        """
        Count a wrong attempt from C{host}.

        @param host: The visitor's address.
        """
        now = self._clock.seconds()
        self._prune(now)
        key = addressKey(host)
        self._all.append((now, key))
        self._byAddress.setdefault(key, deque()).append(now)


class PairingCodes:
    """
    The pairing codes a tunnel has issued and not yet seen redeemed.
    """

    def __init__(
        self,
        clock: IReactorTime,
        ttl: float = CODE_TTL,
        maxOutstanding: int = MAX_OUTSTANDING_CODES,
        limiter: AttemptLimiter | None = None,
    ) -> None:
        """
        @param clock: The source of the current time.
        @param ttl: Seconds a code may be redeemed after it is issued.
        @param maxOutstanding: Most codes remembered at once; issuing more forgets the oldest.
        @param limiter: The limit on wrong attempts (by default L{AttemptLimiter}'s defaults).
        """
        self._clock = clock
        self.ttl = ttl
        self.maxOutstanding = maxOutstanding
        self.limiter = limiter if limiter is not None else AttemptLimiter(clock)
        self._codes: OrderedDict[str, IssuedCode] = OrderedDict()

    def __len__(self) -> int:
        """
        @return: The number of codes issued and neither redeemed nor forgotten (expired ones
            included until they are pruned).
        """
        return len(self._codes)

    def issue(self, name: str | None = None) -> IssuedCode:
        """
        Issue a new code.

        @param name: The name to give the terminal that pairs with it, or L{None}.
        @return: The code.
        """
        now = self._clock.seconds()
        self._prune(now)
        while len(self._codes) >= self.maxOutstanding:
            self._codes.popitem(last=False)
        code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
        while code in self._codes:
            code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
        issued = IssuedCode(formatCode(code), now + self.ttl, name)
        self._codes[code] = issued
        return issued

    def _prune(self, now: float) -> None:
        """
        Forget expired codes (codes are kept in issue order, which is expiry order).
        """
        while self._codes:
            oldest = next(iter(self._codes.values()))
            if now < oldest.expiresAt:
                break
            self._codes.popitem(last=False)

    def check(self, host: str) -> None:
        """
        Refuse early a visitor who may not try a code now (before any costly work).

        @param host: The visitor's address.
        @raise TooManyAttempts: See L{AttemptLimiter.check}.
        """
        self.limiter.check(host)

    def redeem(self, typed: str, host: str) -> IssuedCode:
        """
        Use up a code.

        @param typed: The code as the visitor typed it.
        @param host: The visitor's address, whose wrong attempts are counted.
        @return: The code's record.
        @raise TooManyAttempts: If the visitor may not try a code now; the code is not looked at.
        @raise WrongCode: If the code was not issued here, was already used, or has expired; the
            attempt is counted.
        """
        self.limiter.check(host)
        now = self._clock.seconds()
        self._prune(now)
        issued = self._codes.pop(normalizeCode(typed), None)
        if issued is None:
            self.limiter.failed(host)
            raise WrongCode(
                "wrong pairing code, or it was already used or has expired; "
                "run 'portal pair' for a new one"
            )
        return issued

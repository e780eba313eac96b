"""
The command-line terminal: C{portal pair --join URL CODE} and C{portal pair --session URL}.

A command-line terminal pairs and renews its sessions exactly like a browser
(L{portal.gateway.terminalpages}): it keeps its own ECDSA P-256 key in a file only its owner can
read (one key per app, like a browser's per-origin key), answers the tunnel's nonces with
signatures bound to the app's host, and receives the session cookie.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import attrs
import hyperlink
import treq
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from portal.gateway.proof import (
    PURPOSE_PAIR,
    PURPOSE_SESSION,
    encode,
    p1363FromDER,
    proofMessage,
)
from portal.gateway.sessions import SESSION_COOKIE
from portal.gateway.terminalpages import CHALLENGE_PATH, PAIR_PATH, SESSION_PATH
from portal.gateway.terminals import terminalId
from portal.trust.privatefiles import (
    PRIVATE_FILE_MODE,
    NotRegularFileError,
    PermissionsTooOpenError,
    makePrivateDirectories,
    openPrivateFile,
    writeFileAtomically,
)

#: The directory, in the config directory, holding a command-line terminal's keys (one per app).
KEYS_DIRNAME = "terminal-keys"

#: Seconds a pairing or a renewal may take, all requests included.
REQUEST_TIMEOUT = 30.0

#: Largest answer read from the tunnel.
MAX_ANSWER = 65536


class TerminalClientError(Exception):
    """
    Pairing or a session renewal failed; the message says why, for the user.

    @ivar reason: The app's short code for a refusal (C{"revoked"}, C{"wrong-code"}...), or
        L{None}.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


@attrs.frozen
class AppURL:
    """
    The app a command-line terminal pairs with.

    @ivar origin: C{https://host[:port]}, where requests go.
    @ivar authority: C{host[:port]} in lower case, as the requests' C{Host} header gives it (no
        port for 443), which proofs are bound to.
    """

    origin: str
    authority: str

    @property
    def keyName(self) -> str:
        """
        The file name of this app's terminal key: the authority with anything but letters, digits,
        dots and dashes replaced by C{_}.
        """
        return re.sub(r"[^a-z0-9.-]", "_", self.authority) + ".pem"


def parseAppURL(text: str) -> AppURL:
    """
    Read the app URL a user gives (with or without the pairing page's path).

    @param text: An C{https://} URL.
    @return: The app.
    @raise TerminalClientError: If it is not an https URL with a host.
    """
    try:
        url = hyperlink.URL.from_text(text.strip())
    except (ValueError, hyperlink.URLParseError):
        raise TerminalClientError(f"{text!r} is not a URL")
    if url.scheme.lower() != "https" or not url.host:
        raise TerminalClientError(f"{text!r}: expected the app's https:// URL")
    host = url.host.lower()
    if ":" in host:
        host = f"[{host}]"
    port = url.port or 443
    authority = host if port == 443 else f"{host}:{port}"
    return AppURL(f"https://{authority}", authority)


def defaultKeyPath(configDir: str, app: AppURL) -> str:
    """
    @param configDir: The Portal config directory (the identity file's directory).
    @param app: The app.
    @return: Where this machine's terminal key for C{app} is kept.
    """
    return os.path.join(configDir, KEYS_DIRNAME, app.keyName)


class TerminalKey:
    """
    A command-line terminal's ECDSA P-256 key.
    """

    def __init__(self, privateKey: ec.EllipticCurvePrivateKey) -> None:
        """
        @param privateKey: The key; never logged or sent anywhere.
        """
        self._privateKey = privateKey

    @classmethod
    def generate(cls) -> TerminalKey:
        """
        @return: A new random key.
        """
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @property
    def publicKey(self) -> bytes:
        """
        The public key as a DER SubjectPublicKeyInfo, as the pairing request sends it.
        """
        return self._privateKey.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def id(self) -> str:
        """
        The terminal id this key gives (L{terminalId}).
        """
        return terminalId(self.publicKey)

    def sign(self, message: bytes) -> bytes:
        """
        @return: An ECDSA signature over the SHA-256 of C{message}, in WebCrypto's P1363 form.
        """
        return p1363FromDER(self._privateKey.sign(message, ec.ECDSA(hashes.SHA256())))

    def save(self, path: str) -> None:
        """
        Write the key (PKCS#8 PEM) to a new file only its owner may read; an existing file is never
        replaced.

        @raise TerminalClientError: If the file exists or cannot be written.
        """
        pem = self._privateKey.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            makePrivateDirectories(os.path.dirname(os.path.abspath(path)))
            writeFileAtomically(path, pem, PRIVATE_FILE_MODE, overwrite=False)
        except FileExistsError:
            raise TerminalClientError(f"a terminal key already exists at {path}")
        except OSError as e:
            raise TerminalClientError(f"cannot write the terminal key {path}: {e.strerror or e}")

    @classmethod
    def load(cls, path: str) -> TerminalKey:
        """
        Read a key written by L{save}.

        @raise FileNotFoundError: If there is no file at C{path}.
        @raise TerminalClientError: If it cannot be read, others may read it, or it is not a P-256
            private key.
        """
        try:
            with openPrivateFile(path) as f:
                pem = f.read()
        except FileNotFoundError:
            raise
        except PermissionsTooOpenError as e:
            raise TerminalClientError(
                f"the terminal key {path} has mode {e.mode:04o}, so others may read it; run "
                f"'chmod 600 {path}' and revoke this terminal if anyone else could have read it"
            )
        except (NotRegularFileError, OSError) as e:
            raise TerminalClientError(f"cannot read the terminal key {path}: {e}")
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError):
            raise TerminalClientError(f"{path} does not hold a terminal key")
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise TerminalClientError(f"{path} does not hold an ECDSA P-256 key")
        return cls(key)

    @classmethod
    def loadOrCreate(cls, path: str) -> tuple[TerminalKey, bool]:
        """
        Read the key at C{path}, or make and save a new one when there is none.

        @return: The key, and whether it is new.
        @raise TerminalClientError: See L{load} and L{save}.
        """
        try:
            return cls.load(path), False
        except FileNotFoundError:
            key = cls.generate()
            key.save(path)
            return key, True


def isLocalhost(host: str) -> bool:
    """
    @return: Whether C{host} is C{localhost} or a name under it, which RFC 6761 reserves for
        loopback (browsers and curl resolve them so; system resolvers often do not).
    """
    host = host.lower().rstrip(".")
    return host == "localhost" or host.endswith(".localhost")


@implementer(IAgentEndpointFactory)
class _AppEndpoints:
    """
    Endpoints for the app's C{https://} URLs: TLS for the URL's host, to the address its name
    resolves to, or to 127.0.0.1 for C{*.localhost} names (Portal's default tunnel domain).
    """

    def __init__(self, reactor: Any, policy: BrowserLikePolicyForHTTPS) -> None:
        self._reactor = reactor
        self._policy = policy

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        """
        @param uri: The request's L{twisted.web.client.URI}.
        @return: A TLS endpoint for it.
        """
        host = uri.host.decode("ascii")
        inner: IStreamClientEndpoint
        if isLocalhost(host):
            inner = TCP4ClientEndpoint(self._reactor, "127.0.0.1", uri.port, timeout=10)
        else:
            inner = HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=10)
        return wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), inner)


def httpClient(reactor: Any, caCertificate: str | None = None) -> treq.client.HTTPClient:
    """
    An HTTP client for talking to an app.

    @param reactor: The reactor.
    @param caCertificate: A PEM file of the CA to trust for the app's certificate (the tunnel's
        local CA); by default the system's trusted CAs.
    @raise TerminalClientError: If the CA file cannot be read.
    """
    policy = BrowserLikePolicyForHTTPS()
    if caCertificate is not None:
        try:
            with open(caCertificate, "rb") as f:
                certificate = Certificate.loadPEM(f.read())
        except OSError as e:
            raise TerminalClientError(f"cannot read the CA certificate {caCertificate}: {e}")
        except Exception as e:
            # pyOpenSSL raises its own error type for a file that is not a certificate.
            raise TerminalClientError(f"{caCertificate} is not a PEM certificate: {e}")
        policy = BrowserLikePolicyForHTTPS(trustRootFromCertificates([certificate]))
    return treq.client.HTTPClient(
        Agent.usingEndpointFactory(reactor, _AppEndpoints(reactor, policy))
    )


async def _post(http: Any, app: AppURL, path: bytes, document: dict[str, Any]) -> Any:
    """
    POST a JSON document to one of the app's terminal endpoints.

    @return: The answer: its JSON object and its response.
    @raise TerminalClientError: If the app refuses (with its message) or does not answer JSON.
    """
    url = app.origin + path.decode("ascii")
    try:
        response = await http.post(
            url,
            data=json.dumps(document).encode("utf-8"),
            headers={b"content-type": [b"application/json"]},
        )
        chunks: list[bytes] = []

        def collect(data: bytes) -> None:
            chunks.append(data)
            if sum(map(len, chunks)) > MAX_ANSWER:
                # Raising here makes treq close the connection.
                raise TerminalClientError(f"{app.origin} answered more than {MAX_ANSWER} bytes")

        await treq.collect(response, collect)
        body = b"".join(chunks)
    except TerminalClientError:
        raise
    except Exception as e:
        # Agent's errors (ResponseNeverReceived, ...) wrap the failures that say why.
        reasons = getattr(e, "reasons", None)
        message = reasons[0].getErrorMessage() if reasons else str(e)
        if "certificate verify failed" in message:
            message += " (give the tunnel's local CA with --cacert, or use a trusted certificate)"
        raise TerminalClientError(f"cannot reach {app.origin}: {message}")
    try:
        answer = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        answer = None
    if not isinstance(answer, dict):
        raise TerminalClientError(
            f"{app.origin} answered {response.code} without a terminal endpoint's JSON "
            f"(is it a Portal app?)"
        )
    if response.code != 200:
        reason = answer.get("reason")
        raise TerminalClientError(
            str(answer.get("error") or f"HTTP {response.code}"),
            reason if isinstance(reason, str) else None,
        )
    return answer, response


async def _prove(http: Any, app: AppURL, key: TerminalKey, purpose: str) -> dict[str, str]:
    """
    Fetch a nonce and sign it.

    @return: The proof's fields.
    """
    answer, _ = await _post(http, app, CHALLENGE_PATH, {})
    nonce = answer.get("nonce")
    if not isinstance(nonce, str):
        raise TerminalClientError(f"{app.origin} gave no challenge")
    return {
        "nonce": nonce,
        "signature": encode(key.sign(proofMessage(purpose, app.authority, nonce))),
    }


def _sessionToken(response: Any) -> str:
    """
    @return: The session token the app set in its answer.
    @raise TerminalClientError: If it set none.
    """
    prefix = SESSION_COOKIE + b"="
    for value in response.headers.getRawHeaders(b"set-cookie", []):
        if value.startswith(prefix):
            return str(value[len(prefix) :].partition(b";")[0].decode("ascii"))
    raise TerminalClientError("the app gave no session")


@attrs.frozen
class Session:
    """
    A terminal's session with an app.

    @ivar terminal: The terminal's id.
    @ivar name: Its name at the app.
    @ivar token: The session token (the value of the L{SESSION_COOKIE} cookie).
    @ivar expires: When it expires (seconds since the epoch).
    """

    terminal: str
    name: str
    token: str = attrs.field(repr=False)
    expires: float

    @property
    def cookie(self) -> str:
        """
        The session as a cookie, C{__Host-ptl-session=TOKEN} (for C{curl -b}).
        """
        return f"{SESSION_COOKIE.decode('ascii')}={self.token}"


def _session(answer: dict[str, Any], response: Any) -> Session:
    """
    @return: The session an app's answer gives.
    """
    return Session(
        str(answer.get("terminal", "")),
        str(answer.get("name", "")),
        _sessionToken(response),
        float(answer.get("expires", 0)),
    )


def join(
    reactor: Any,
    http: Any,
    app: AppURL,
    key: TerminalKey,
    code: str,
    name: str | None = None,
    timeout: float = REQUEST_TIMEOUT,
) -> Deferred[Session]:
    """
    Pair this machine with an app as a terminal.

    @param reactor: The clock of the timeout.
    @param http: An object with C{treq}'s C{post} (L{httpClient}, or a C{StubTreq} in tests).
    @param app: The app.
    @param key: This machine's key for the app.
    @param code: The pairing code the owner gave.
    @param name: The name to give this terminal, or L{None} to let the owner's code name it.
    @param timeout: Seconds the whole exchange may take.
    @return: A L{Deferred} firing with the first session, or failing with L{TerminalClientError}.
    """

    async def pair() -> Session:
        proof = await _prove(http, app, key, PURPOSE_PAIR)
        document: dict[str, Any] = {"code": code, "publicKey": encode(key.publicKey), **proof}
        if name:
            document["name"] = name
        answer, response = await _post(http, app, PAIR_PATH, document)
        return _session(answer, response)

    return _timed(reactor, Deferred.fromCoroutine(pair()), timeout, app)


def openSession(
    reactor: Any, http: Any, app: AppURL, key: TerminalKey, timeout: float = REQUEST_TIMEOUT
) -> Deferred[Session]:
    """
    Get a fresh session for an already paired terminal.

    @param reactor: The clock of the timeout.
    @param http: An object with C{treq}'s C{post}.
    @param app: The app.
    @param key: This machine's key for the app.
    @param timeout: Seconds the whole exchange may take.
    @return: A L{Deferred} firing with the session, or failing with L{TerminalClientError}.
    """

    async def renew() -> Session:
        proof = await _prove(http, app, key, PURPOSE_SESSION)
        answer, response = await _post(http, app, SESSION_PATH, {"terminal": key.id, **proof})
        return _session(answer, response)

    return _timed(reactor, Deferred.fromCoroutine(renew()), timeout, app)


def _timed(reactor: Any, d: Deferred[Session], timeout: float, app: AppURL) -> Deferred[Session]:
    """
    Fail C{d} with L{TerminalClientError} when it takes longer than C{timeout} seconds.
    """

    def timedOut(result: object, timeout: float) -> Session:
        raise TerminalClientError(f"{app.origin} did not answer within {timeout:g} s")

    return d.addTimeout(timeout, reactor, onTimeoutCancel=timedOut)

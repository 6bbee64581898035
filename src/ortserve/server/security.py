"""Who may call the server, over what: TLS (optionally mutual) and bearer-token authentication.

    tls = TlsSettings.from_files("server.crt", "server.key", client_ca="ca.crt")   # client_ca: mutual TLS
    auth = TokenAuthority.from_file("tokens.txt")                                  # or .from_env()
    server = InferenceServer.from_location("models/repository", ServerOptions(tls=tls, auth=auth))

or on the command line: `--tls_cert FILE --tls_key FILE [--tls_client_ca FILE] [--auth_token_file FILE]`, or the
token in the environment variable ORTSERVE_AUTH_TOKEN.

TLS. `TlsSettings.from_files` reads and checks the PEM files at start-up (every file readable, the key is the
certificate's, the client CA parses) and raises ConfigurationError saying which file is wrong and how, so a
server never starts half-secured. With a client CA, the server asks every caller for a certificate signed by it
(mutual TLS) and refuses the handshake without one. The same settings give uvicorn's ssl keyword arguments for
the REST endpoint.

Tokens. Every call must carry the metadata (HTTP header) `authorization: Bearer <token>`, except the health
checks a load balancer or orchestrator makes without credentials: grpc.health.v1 and the Open Inference
Protocol's ServerLive, ServerReady and ModelReady (over REST: GET /v2/health/live, /v2/health/ready and
/v2/models/NAME[/versions/V]/ready). They tell whether the server (or a model of a given name) is up, nothing
more. Server reflection needs a token like any other call: it is how a tool explores the server, not how an
orchestrator probes it, and grpcurl sends its -H headers with reflection requests too. A missing, malformed or
unknown token gets UNAUTHENTICATED (HTTP 401 with `WWW-Authenticate: Bearer`) with a message saying what was
expected; the token itself is never echoed, logged (at any level) or shown in a repr.

Where tokens come from: a file (one token per line; blank lines and lines starting with # are ignored) or the
environment variable ORTSERVE_AUTH_TOKEN (one token, or several separated by commas). Giving both is an error,
because one of them would be silently ignored. Every token listed is accepted, so tokens rotate without downtime:
add the new token, move the clients over, remove the old one. The file is re-read when it changes (checked at
most once a second, as calls come), so rotation needs no restart; a change that leaves the file unusable (empty,
unreadable) is logged and the tokens read before stay in force. Tokens are compared with hmac.compare_digest
against every configured token, so the time a check takes tells nothing about how much of a guess was right.

`make_throwaway_pki(dir)` writes a CA, a server certificate for localhost/127.0.0.1/::1 and a client
certificate, valid for a day: for tests and lessons, never for production.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import logging
import os
import re
import secrets
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Sequence

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ortserve.server.errors import ConfigurationError, Unauthenticated, status_of

log = logging.getLogger(__name__)

TOKEN_ENV = "ORTSERVE_AUTH_TOKEN"
TOKEN_RELOAD_INTERVAL = 1.0  # seconds between checks of the token file for changes
AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case; HTTP headers are case-insensitive
BEARER = "Bearer"
EXPECTED = f"'{AUTHORIZATION}: {BEARER} <token>'"
# RFC 6750's token syntax (b64token): what can travel after "Bearer " in a header without quoting.
TOKEN_SYNTAX = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
SHORT_TOKEN = 16  # characters; shorter tokens are accepted with a warning

# Health checks answer without a token (see the module docstring).
HEALTH_SERVICES = frozenset({"grpc.health.v1.Health"})
HEALTH_METHODS = frozenset(
    f"/inference.GRPCInferenceService/{name}" for name in ("ServerLive", "ServerReady", "ModelReady")
)

# The REST forms of the same checks (ortserve.server.rest): server live/ready, model ready.
HEALTH_ROUTES = re.compile(r"^/v2/(?:health/(?:live|ready)|models/[^/]+(?:/versions/[^/]+)?/ready)$")


def is_health_check(method: str) -> bool:
    """`method` is gRPC's "/package.Service/Method"."""
    return method in HEALTH_METHODS or method[1:].rpartition("/")[0] in HEALTH_SERVICES


def is_health_route(path: str) -> bool:
    """`path` is an HTTP request's path (REST)."""
    return HEALTH_ROUTES.match(path) is not None


def bearer_metadata(token: str) -> tuple[tuple[str, str]]:
    """The gRPC metadata that carries `token` (what clients send with every call)."""
    if not TOKEN_SYNTAX.match(token):
        raise ValueError("the token has characters a bearer token cannot carry (expected letters, digits and "
                         "-._~+/ with optional trailing '=')")  # fmt: skip
    return ((AUTHORIZATION, f"{BEARER} {token}"),)


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe base64): what to put in a token file."""
    return secrets.token_urlsafe(32)


# --------------------------------------------------------------------------------------------------
# Tokens


TOKEN_FILE_FORMAT = "one token per line; lines starting with # are comments"
TOKEN_ENV_FORMAT = "one token, or several separated by commas"


def parse_tokens(items: Iterable[str], source: str, item: str = "line", expected: str = TOKEN_FILE_FORMAT) -> list[str]:
    """The tokens in `items` (blank ones and # comments skipped), checked; errors name the item, not the token."""
    tokens = []
    for number, text in enumerate(items, 1):
        token = text.strip()
        if not token or token.startswith("#"):
            continue
        if not TOKEN_SYNTAX.match(token):
            raise ConfigurationError(
                f"{source}, {item} {number}: has characters a bearer token cannot carry (expected letters, digits "
                f"and -._~+/ with optional trailing '='; make one with `python -c \"import secrets; "
                f"print(secrets.token_urlsafe(32))\"`)"
            )
        tokens.append(token)
    if not tokens:
        raise ConfigurationError(f"{source}: no token in it (expected {expected})")
    return tokens


def read_token_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigurationError(f"token file {path}: cannot read it ({_reason(error)})") from None
    return parse_tokens(text.splitlines(), f"token file {path}")


class TokenAuthority:
    """The bearer tokens the server accepts, and the check of one presented with a call."""

    def __init__(
        self,
        tokens: Sequence[str],
        source: str = "the tokens given",
        path: Path | None = None,
        reload_interval: float = TOKEN_RELOAD_INTERVAL,
    ) -> None:
        self.source = source  # where the tokens came from, for logs ("token file tokens.txt")
        self._tokens = self._encoded(tokens)
        self._path = path
        self._stamp = _file_stamp(path) if path is not None else None
        self._reload_interval = reload_interval  # seconds between looks at the file; 0: at every call
        self._next_check = time.monotonic() + reload_interval

    @classmethod
    def from_file(cls, path: Path | str, reload_interval: float = TOKEN_RELOAD_INTERVAL) -> "TokenAuthority":
        path = Path(path)
        return cls(read_token_file(path), f"token file {path}", path, reload_interval)

    @classmethod
    def from_env(cls, name: str = TOKEN_ENV) -> "TokenAuthority":
        value = os.environ.get(name, "")
        return cls(parse_tokens(value.split(","), f"${name}", "token", TOKEN_ENV_FORMAT), f"${name}")

    @classmethod
    def from_sources(cls, token_file: Path | str | None, env: str = TOKEN_ENV) -> "TokenAuthority | None":
        """The command line's choice: the token file, else the environment variable, else None (no auth)."""
        if token_file is not None and env in os.environ:
            raise ConfigurationError(f"both --auth_token_file and ${env} give tokens; use one of them, so that "
                                     "no token is silently ignored")  # fmt: skip
        if token_file is not None:
            return cls.from_file(token_file)
        if env in os.environ:  # set but empty is a mistake worth a clear error, not "authentication off"
            return cls.from_env(env)
        return None

    @staticmethod
    def _encoded(tokens: Sequence[str]) -> tuple[bytes, ...]:
        if not tokens:
            raise ConfigurationError("no token given")
        if any(len(t) < SHORT_TOKEN for t in tokens):
            log.warning("a token is shorter than %d characters: easy to guess; make long random ones with "
                        "ortserve.server.security.new_token()", SHORT_TOKEN)  # fmt: skip
        return tuple(t.encode() for t in tokens)

    @property
    def count(self) -> int:
        return len(self._tokens)

    def __repr__(self) -> str:
        return f"TokenAuthority({self.count} token(s) from {self.source})"

    def accepts(self, token: str | bytes) -> bool:
        """Whether `token` is one of ours. Compared with every token in constant time, whatever matches."""
        self._reload_if_changed()
        presented = token.encode() if isinstance(token, str) else token
        matched = False
        for known in self._tokens:
            matched |= hmac.compare_digest(presented, known)
        return matched

    def check(self, values: Sequence[str]) -> None:
        """Raise Unauthenticated unless `values`, every value of the call's authorization metadata (header), is
        one good bearer token."""
        if not values:
            raise Unauthenticated(f"this server requires a bearer token: send the metadata (header) {EXPECTED}")
        if len(values) > 1:
            raise Unauthenticated(f"{len(values)} {AUTHORIZATION} values came; expected one, {EXPECTED}")
        authorization = values[0]
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != BEARER.lower() or not token:
            # Say what came without repeating it: a token sent without "Bearer " is still a secret.
            raise Unauthenticated(f"the {AUTHORIZATION} value ({len(authorization)} characters) is not of the form "
                                  f"'{BEARER} <token>'; expected {EXPECTED}")  # fmt: skip
        if not self.accepts(token):
            raise Unauthenticated("the bearer token is not one this server accepts")

    def _reload_if_changed(self) -> None:
        if self._path is None or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + self._reload_interval
        stamp = _file_stamp(self._path)
        if stamp == self._stamp:
            return
        self._stamp = stamp  # a broken file is reported once, not at every check
        try:
            self._tokens = self._encoded(read_token_file(self._path))
        except ConfigurationError as error:
            log.error("%s; keeping the %d token(s) read before", error, self.count)
            return
        log.info("%s changed: %d token(s) now accepted", self.source, self.count)


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten or replaced (Kubernetes swaps a symlink)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Turns away every call without a good bearer token, except health checks, with UNAUTHENTICATED."""

    def __init__(self, authority: TokenAuthority) -> None:
        self.authority = authority

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:  # fmt: skip
        if is_health_check(details.method):
            return await continuation(details)
        try:
            self.authority.check([v for k, v in details.invocation_metadata or () if k == AUTHORIZATION])
        except Unauthenticated as error:
            log.info("refused %s: %s", details.method, error.message)
            handler = await continuation(details)
            return None if handler is None else refusal(handler, error)
        return await continuation(details)


def refusal(handler: grpc.RpcMethodHandler, error: Unauthenticated) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with `error`'s status, running nothing."""
    code, message = status_of(error)

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)  # fmt: skip


# --------------------------------------------------------------------------------------------------
# TLS


@dataclass(frozen=True)
class TlsSettings:
    """The server's certificate chain and key (PEM), and for mutual TLS the CA its clients' certificates need."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None
    cert_pem: bytes = field(default=b"", repr=False)
    key_pem: bytes = field(default=b"", repr=False)  # a private key: never in a repr or a log
    client_ca_pem: bytes | None = field(default=None, repr=False)

    @classmethod
    def from_files(cls, cert: Path | str, key: Path | str, client_ca: Path | str | None = None) -> "TlsSettings":
        """Read and check the files; ConfigurationError says which one is wrong and how."""
        cert, key = Path(cert), Path(key)
        cert_pem, key_pem = _read(cert, "certificate (--tls_cert)"), _read(key, "private key (--tls_key)")
        certificates = _certificates(cert_pem, cert, "certificate (--tls_cert)")
        private_key = _private_key(key_pem, key)
        public = serialization.PublicFormat.SubjectPublicKeyInfo
        if private_key.public_key().public_bytes(serialization.Encoding.DER, public) != \
                certificates[0].public_key().public_bytes(serialization.Encoding.DER, public):  # fmt: skip
            raise ConfigurationError(f"private key {key} does not belong to certificate {cert} (the first "
                                     "certificate in the file must be the server's own, made for this "
                                     "key)")  # fmt: skip
        _warn_if_out_of_date(certificates[0], cert)
        client_ca_pem = None
        if client_ca is not None:
            client_ca = Path(client_ca)
            client_ca_pem = _read(client_ca, "client CA (--tls_client_ca)")
            _certificates(client_ca_pem, client_ca, "client CA (--tls_client_ca)")
        return cls(cert, key, client_ca, cert_pem, key_pem, client_ca_pem)

    @property
    def mutual(self) -> bool:
        return self.client_ca_pem is not None

    def describe(self) -> str:
        return "mutual TLS" if self.mutual else "TLS"

    def grpc_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.client_ca_pem,
                                           require_client_auth=self.mutual)  # fmt: skip

    def uvicorn_kwargs(self) -> dict[str, Any]:
        """uvicorn.Config's ssl arguments for the same certificate, key and client CA."""
        kwargs: dict[str, Any] = {"ssl_certfile": str(self.cert_file), "ssl_keyfile": str(self.key_file)}
        if self.mutual:
            kwargs.update(ssl_ca_certs=str(self.client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
        return kwargs


def _reason(error: BaseException) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigurationError(f"{what} {path}: cannot read it ({_reason(error)})") from None


def _certificates(pem: bytes, path: Path, what: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certificates = []
    if not certificates:
        raise ConfigurationError(f"{what} {path}: no PEM certificate in it (expected '-----BEGIN CERTIFICATE-----' "
                                 "blocks)")  # fmt: skip
    return certificates


def _private_key(pem: bytes, path: Path):
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # encrypted
        raise ConfigurationError(f"private key {path}: it is encrypted; the server needs an unencrypted PEM key "
                                 "(protect it with file permissions instead)") from None  # fmt: skip
    except (ValueError, UnsupportedAlgorithm) as error:
        raise ConfigurationError(f"private key {path}: not a PEM private key (expected a '-----BEGIN ... PRIVATE "
                                 f"KEY-----' block; {type(error).__name__})") from None  # fmt: skip


def _warn_if_out_of_date(certificate: x509.Certificate, path: Path) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    if now > certificate.not_valid_after_utc:
        log.warning("certificate %s expired on %s: clients will refuse the connection", path,
                    certificate.not_valid_after_utc.isoformat())  # fmt: skip
    elif now < certificate.not_valid_before_utc:
        log.warning("certificate %s is valid only from %s: clients will refuse the connection until then", path,
                    certificate.not_valid_before_utc.isoformat())  # fmt: skip


# --------------------------------------------------------------------------------------------------
# A throw-away PKI for tests and lessons


@dataclass(frozen=True)
class ThrowawayPki:
    """PEM files of a one-day CA, a server certificate and key, a client certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_flags(self, mutual: bool = False) -> list[str]:
        """The `serve` flags for this server certificate (and, with mutual=True, for client certificates)."""
        flags = ["--tls_cert", str(self.server_cert), "--tls_key", str(self.server_key)]
        return flags + ["--tls_client_ca", str(self.ca_cert)] if mutual else flags

    def server_tls(self, mutual: bool = False) -> TlsSettings:
        return TlsSettings.from_files(self.server_cert, self.server_key, self.ca_cert if mutual else None)


def make_throwaway_pki(directory: Path | str, hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
                       valid_for: datetime.timedelta = datetime.timedelta(days=1)) -> ThrowawayPki:  # fmt: skip
    """Write ca.crt, server.crt/.key (for `hosts`) and client.crt/.key into `directory`. Not for production."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + valid_for  # a little slack for clock skew

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ortserve throw-away PKI"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common_name)])  # fmt: skip

    def certificate(subject: str, key, issuer: x509.Name, signer, extensions) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(issuer)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(start).not_valid_after(end))  # fmt: skip
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate("ortserve test CA", ca_key, name("ortserve test CA"), ca_key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
                       decipher_only=False), True),  # fmt: skip
        (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
    ])

    def leaf(subject: str, usage, alternative_names) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        extensions = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([usage]), False),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
        ]
        if alternative_names:
            extensions.append((x509.SubjectAlternativeName(alternative_names), False))
        return certificate(subject, key, ca.subject, ca_key, extensions), key

    server_names = [_general_name(h) for h in hosts]
    server, server_key = leaf(hosts[0] if hosts else "server", ExtendedKeyUsageOID.SERVER_AUTH, server_names)
    client, client_key = leaf("ortserve test client", ExtendedKeyUsageOID.CLIENT_AUTH, [])

    pki = ThrowawayPki(*(directory / f for f in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")))
    for path, cert in ((pki.ca_cert, ca), (pki.server_cert, server), (pki.client_cert, client)):
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    for path, key in ((pki.server_key, server_key), (pki.client_key, client_key)):
        path.touch(mode=0o600)
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))  # fmt: skip
    return pki


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def describe(tls: TlsSettings | None, auth: TokenAuthority | None) -> str:
    """How a server is secured, in words for its ready line and log ("mutual TLS, bearer tokens"); "" if not."""
    parts = ([tls.describe()] if tls else []) + (["bearer tokens"] if auth else [])
    return ", ".join(parts)

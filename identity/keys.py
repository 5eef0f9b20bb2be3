"""Workload keys and CSRs, and a CA answer's signatures, with the process's own OpenSSL.

Owns :func:`new_key_and_csr` (an ECDSA P-256 key and a PKCS #10 request for
one SPIFFE ID, PROTOCOLS.md section 4), :class:`WorkloadKey` (the key as PEM,
for loading into TLS contexts, and its public key) and :func:`issued_by`
(whether one certificate's signature verifies with another's public key).

Why here and not the ``cryptography`` package: the data plane (ztunnel) keeps
a key per service account and asks the CA to sign it, and that is all it
does with keys. ``cryptography`` brings a second OpenSSL, a Rust extension
and 67 modules for it, about 5 MiB of a node's ztunnel (bench.ztunnel_memory);
the ``ssl`` module has already loaded libcrypto into the process. These
functions call that libcrypto through ``ctypes``: the calls are few, each
object is freed in ``finally``, every prototype is declared (pointers as
``c_void_p``, never a default ``int``), and every failure becomes an
:class:`OpenSslError` carrying OpenSSL's own error queue. The CSR's DER is
written by :mod:`identity.der`; OpenSSL only generates the key, encodes its
public part and signs. The control plane's CA keeps using ``cryptography``
(:mod:`identity.ca`).

Requires OpenSSL 3 (``EVP_PKEY_CTX_new_from_name``); with an older libcrypto
:func:`new_key_and_csr` raises :class:`OpenSslError` saying so.
"""

from __future__ import annotations

import ctypes
import ssl
import threading
from dataclasses import dataclass, field
from typing import Any, Final

from identity import der
from identity.errors import IdentityError
from identity.spiffe import SpiffeId

CURVE: Final = b"P-256"
_BIO_CTRL_PENDING: Final = 10


class OpenSslError(IdentityError):
    """libcrypto could not be used, or refused an operation (its error queue attached)."""


@dataclass(frozen=True)
class WorkloadKey:
    """A private key as PKCS #8 PEM (never logged: not in ``repr``) and its public key."""

    pem: bytes = field(repr=False)
    public_key_info: bytes  # SubjectPublicKeyInfo, DER

    def __repr__(self) -> str:
        return f"WorkloadKey(P-256, spki={self.public_key_info[-8:].hex()}...)"


# -- libcrypto --------------------------------------------------------------------------

_P = ctypes.c_void_p
_PROTOTYPES: Final[dict[str, tuple[Any, list[Any]]]] = {
    "EVP_PKEY_CTX_new_from_name": (_P, [_P, ctypes.c_char_p, ctypes.c_char_p]),
    "EVP_PKEY_keygen_init": (ctypes.c_int, [_P]),
    "EVP_PKEY_CTX_set_group_name": (ctypes.c_int, [_P, ctypes.c_char_p]),
    "EVP_PKEY_generate": (ctypes.c_int, [_P, ctypes.POINTER(_P)]),
    "EVP_PKEY_CTX_free": (None, [_P]),
    "EVP_PKEY_free": (None, [_P]),
    "i2d_PUBKEY": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_char_p)]),
    "EVP_MD_CTX_new": (_P, []),
    "EVP_MD_CTX_free": (None, [_P]),
    "EVP_sha256": (_P, []),
    "EVP_DigestSignInit": (ctypes.c_int, [_P, _P, _P, _P, _P]),
    "EVP_DigestSign": (
        ctypes.c_int,
        [_P, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_char_p, ctypes.c_size_t],
    ),
    "BIO_s_mem": (_P, []),
    "BIO_new": (_P, [_P]),
    "BIO_free": (ctypes.c_int, [_P]),
    "BIO_read": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_int]),
    "BIO_ctrl": (ctypes.c_long, [_P, ctypes.c_int, ctypes.c_long, _P]),
    "PEM_write_bio_PrivateKey": (ctypes.c_int, [_P, _P, _P, _P, ctypes.c_int, _P, _P]),
    "d2i_X509": (_P, [_P, ctypes.POINTER(ctypes.c_char_p), ctypes.c_long]),
    "X509_free": (None, [_P]),
    "X509_get0_pubkey": (_P, [_P]),
    "X509_verify": (ctypes.c_int, [_P, _P]),
    "ERR_get_error": (ctypes.c_ulong, []),
    "ERR_error_string_n": (None, [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_size_t]),
    "ERR_clear_error": (None, []),
}

_lock = threading.Lock()
_lib: Any = None


def _crypto() -> Any:
    """libcrypto, reached through the ``_ssl`` extension's own handle.

    ``dlsym`` on that handle searches ``_ssl`` and the libraries it was linked
    with, so these are the very functions the ``ssl`` module uses: one OpenSSL
    in the process, not a second copy found by name. The version is checked
    against the one ``ssl`` reports.
    """
    global _lib
    with _lock:
        if _lib is None:
            import _ssl

            path = getattr(_ssl, "__file__", None)
            if path is None:
                raise OpenSslError(
                    "the ssl module is built into this Python (no _ssl extension to reach "
                    "libcrypto through); ztunnel needs a Python with a shared _ssl module"
                )
            lib = ctypes.CDLL(path)
            for name, (restype, argtypes) in _PROTOTYPES.items():
                try:
                    function = getattr(lib, name)
                except AttributeError:
                    raise OpenSslError(
                        f"libcrypto has no {name}: OpenSSL 3 is required "
                        f"({ssl.OPENSSL_VERSION} is loaded)"
                    ) from None
                function.restype = restype
                function.argtypes = argtypes
            lib.OpenSSL_version_num.restype = ctypes.c_ulong
            lib.OpenSSL_version_num.argtypes = []
            if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
                raise OpenSslError(
                    f"the libcrypto found (0x{lib.OpenSSL_version_num():x}) is not the one "
                    f"the ssl module uses ({ssl.OPENSSL_VERSION})"
                )
            _lib = lib
        return _lib


def _fail(lib: Any, what: str) -> OpenSslError:
    """An error for a failed call, with OpenSSL's queue (drained) in the message."""
    reasons = []
    buffer = ctypes.create_string_buffer(256)
    while code := lib.ERR_get_error():
        lib.ERR_error_string_n(code, buffer, len(buffer))
        reasons.append(buffer.value.decode("ascii", "replace"))
    detail = "; ".join(reasons) or "no reason given"
    return OpenSslError(f"OpenSSL failed to {what}: {detail}")


# -- keys and CSRs ----------------------------------------------------------------------


def new_key_and_csr(identity: SpiffeId) -> tuple[WorkloadKey, bytes]:
    """A new P-256 key and a PEM CSR for ``identity`` (its URI the only SAN), signed by it."""
    lib = _crypto()
    lib.ERR_clear_error()
    pkey = _P()
    keygen = lib.EVP_PKEY_CTX_new_from_name(None, b"EC", None)
    if not keygen:
        raise _fail(lib, "create an EC key context")
    try:
        if (
            lib.EVP_PKEY_keygen_init(keygen) <= 0
            or lib.EVP_PKEY_CTX_set_group_name(keygen, CURVE) <= 0
            or lib.EVP_PKEY_generate(keygen, ctypes.byref(pkey)) <= 0
        ):
            raise _fail(lib, "generate a P-256 key")
    finally:
        lib.EVP_PKEY_CTX_free(keygen)
    try:
        spki = _public_key_info(lib, pkey)
        info = der.csr_info(spki, identity.uri)
        request = der.csr(info, _sign_sha256(lib, pkey, info))
        key = WorkloadKey(pem=_private_key_pem(lib, pkey), public_key_info=spki)
    finally:
        lib.EVP_PKEY_free(pkey)
    return key, der.to_pem(request, "CERTIFICATE REQUEST")


def _public_key_info(lib: Any, pkey: ctypes.c_void_p) -> bytes:
    size = lib.i2d_PUBKEY(pkey, None)
    if size <= 0:
        raise _fail(lib, "encode the public key")
    out = ctypes.create_string_buffer(size)
    cursor = ctypes.c_char_p(ctypes.addressof(out))  # i2d advances it; ours stays put
    if lib.i2d_PUBKEY(pkey, ctypes.byref(cursor)) != size:
        raise _fail(lib, "encode the public key")
    return out.raw


def _sign_sha256(lib: Any, pkey: ctypes.c_void_p, data: bytes) -> bytes:
    md_ctx = lib.EVP_MD_CTX_new()
    if not md_ctx:
        raise _fail(lib, "create a digest context")
    try:
        if lib.EVP_DigestSignInit(md_ctx, None, lib.EVP_sha256(), None, pkey) <= 0:
            raise _fail(lib, "start an ECDSA-SHA256 signature")
        size = ctypes.c_size_t(0)
        if lib.EVP_DigestSign(md_ctx, None, ctypes.byref(size), data, len(data)) <= 0:
            raise _fail(lib, "size an ECDSA signature")
        signature = ctypes.create_string_buffer(size.value)
        if lib.EVP_DigestSign(md_ctx, signature, ctypes.byref(size), data, len(data)) <= 0:
            raise _fail(lib, "sign the CSR")
        return signature.raw[: size.value]
    finally:
        lib.EVP_MD_CTX_free(md_ctx)


def _private_key_pem(lib: Any, pkey: ctypes.c_void_p) -> bytes:
    bio = lib.BIO_new(lib.BIO_s_mem())
    if not bio:
        raise _fail(lib, "create a memory BIO")
    try:
        if lib.PEM_write_bio_PrivateKey(bio, pkey, None, None, 0, None, None) <= 0:
            raise _fail(lib, "write the private key")
        pending = lib.BIO_ctrl(bio, _BIO_CTRL_PENDING, 0, None)
        out = ctypes.create_string_buffer(pending)
        try:
            if lib.BIO_read(bio, out, pending) != pending:
                raise _fail(lib, "read the private key back")
            return out.raw
        finally:
            ctypes.memset(out, 0, pending)  # the bytes returned are the only copy left
    finally:
        lib.BIO_free(bio)


# -- certificates -----------------------------------------------------------------------


def issued_by(child_der: bytes, parent_der: bytes) -> bool:
    """Whether ``child``'s signature verifies with ``parent``'s public key.

    Only the signature (any algorithm OpenSSL knows): names, validity and
    extensions are the TLS handshake's business. Not a certificate: False.
    """
    lib = _crypto()
    lib.ERR_clear_error()
    child = _load_x509(lib, child_der)
    if not child:
        lib.ERR_clear_error()
        return False
    try:
        parent = _load_x509(lib, parent_der)
        if not parent:
            lib.ERR_clear_error()
            return False
        try:
            public_key = lib.X509_get0_pubkey(parent)
            ok = bool(public_key) and lib.X509_verify(child, public_key) == 1
        finally:
            lib.X509_free(parent)
    finally:
        lib.X509_free(child)
    lib.ERR_clear_error()
    return ok


def is_certificate(data: bytes) -> bool:
    """Whether OpenSSL reads ``data`` as exactly one X.509 certificate (DER)."""
    lib = _crypto()
    lib.ERR_clear_error()
    x509 = _load_x509(lib, data)
    lib.ERR_clear_error()
    if not x509:
        return False
    lib.X509_free(x509)
    return True


def _load_x509(lib: Any, data: bytes) -> Any:
    buffer = ctypes.create_string_buffer(data, len(data))
    cursor = ctypes.c_char_p(ctypes.addressof(buffer))
    x509 = lib.d2i_X509(None, ctypes.byref(cursor), len(data))
    # d2i moves the cursor to the end of what it read: a shorter read is trailing garbage.
    if x509 and ctypes.cast(cursor, _P).value != ctypes.addressof(buffer) + len(data):
        lib.X509_free(x509)
        return None
    return x509


__all__ = [
    "CURVE",
    "OpenSslError",
    "WorkloadKey",
    "is_certificate",
    "issued_by",
    "new_key_and_csr",
]

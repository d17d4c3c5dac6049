"""The key-exchange group a TLS connection negotiated (X25519MLKEM768, x25519, secp256r1, ...), for the metrics.

The proxy sets no group list: Python's ssl module cannot before 3.15 (set_ecdh_curve takes one classical curve),
and OpenSSL's defaults are the right ones. OpenSSL 3.5 (Debian trixie, the image) offers the hybrid post-quantum
X25519MLKEM768 first; OpenSSL 3.0 (bookworm) has no ML-KEM and falls back to X25519. What was negotiated is counted
per group so that the fallback shows.

Python's ssl says which group only from 3.15 (SSLObject.group()). Before, this asks OpenSSL through ctypes for the
connection's SSL*, which CPython's _ssl keeps right after the socket weakref in its PySSLSocket, followed by the
context: the layout is confirmed on every object by finding there the context whose address is known. When it is
not confirmed (another interpreter, another layout) the group is "unknown", never guessed.
"""

from __future__ import annotations

import ctypes
import functools
import ssl
import sys

UNKNOWN = "unknown"
_SSL_CTRL_GET_NEGOTIATED_GROUP = 134  # ssl.h: SSL_get_negotiated_group(s) is SSL_ctrl(s, 134, 0, NULL)
_WORD = ctypes.sizeof(ctypes.c_void_p)
_HEADER = object.__basicsize__  # PyObject_HEAD: 16 bytes on a 64-bit CPython with the GIL


class _LibSSL:
    """The libssl that Python's _ssl module is linked to (not whichever one the loader finds first)."""

    def __init__(self) -> None:
        import _ssl

        lib = ctypes.CDLL(getattr(_ssl, "__file__", None))  # dlsym on it searches _ssl's own dependencies
        self.get0_group_name = getattr(lib, "SSL_get0_group_name", None)  # OpenSSL >= 3.2
        if self.get0_group_name is not None:
            self.get0_group_name.argtypes = [ctypes.c_void_p]
            self.get0_group_name.restype = ctypes.c_char_p
        self.ctrl = lib.SSL_ctrl
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.ctrl.restype = ctypes.c_long
        self.group_to_name = getattr(lib, "SSL_group_to_name", None)  # OpenSSL >= 3.0
        if self.group_to_name is not None:
            self.group_to_name.argtypes = [ctypes.c_void_p, ctypes.c_int]
            self.group_to_name.restype = ctypes.c_char_p

    def group_name(self, ssl_pointer: int) -> str | None:
        if self.get0_group_name is not None:
            name = self.get0_group_name(ssl_pointer)
        elif self.group_to_name is not None:
            nid = self.ctrl(ssl_pointer, _SSL_CTRL_GET_NEGOTIATED_GROUP, 0, None)
            name = self.group_to_name(ssl_pointer, nid) if nid > 0 else None
        else:
            return None
        return name.decode("ascii", "replace") if name else None


@functools.cache
def _libssl() -> _LibSSL | None:
    if sys.implementation.name != "cpython":
        return None
    try:
        return _LibSSL()
    except (OSError, AttributeError):
        return None


def ssl_pointer(sslobj: ssl.SSLObject | ssl.SSLSocket) -> int | None:
    """The OpenSSL SSL* behind a CPython SSLObject, or None when the layout is not the one expected."""
    inner = getattr(sslobj, "_sslobj", None)
    if inner is None or type(inner).__basicsize__ < _HEADER + 3 * _WORD:
        return None
    context = ctypes.c_void_p.from_address(id(inner) + _HEADER + 2 * _WORD).value
    if context != id(sslobj.context):  # the layout check: PySSLSocket.ctx is the SSLContext itself
        return None
    return ctypes.c_void_p.from_address(id(inner) + _HEADER + _WORD).value or None


def negotiated_group(sslobj: ssl.SSLObject | ssl.SSLSocket) -> str:
    """The group of a completed handshake's key exchange as OpenSSL names it, or "unknown"."""
    if sslobj.version() is None:  # no handshake yet: OpenSSL 3.0 would read the session it does not have
        return UNKNOWN
    native = getattr(sslobj, "group", None)
    if callable(native):  # Python >= 3.15
        return str(native() or UNKNOWN)
    lib = _libssl()
    pointer = ssl_pointer(sslobj) if lib is not None else None
    if lib is None or pointer is None:
        return UNKNOWN
    return lib.group_name(pointer) or UNKNOWN

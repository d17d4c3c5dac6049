"""The five messages of the SPIFFE Workload API's X.509 profile that meshtls sends, in protobuf's wire format.

The server only ever *writes* these (every request message of the profile is empty, and unknown fields are ignored),
so a few lines of encoding replace generated stubs and a protobuf runtime in the pod. Field numbers are those of
`workload.proto` (the SPIFFE standard's and go-spiffe's `proto/spiffe/workload/workload.proto`, identical for these
messages); tests/test_workload_api.py decodes every message with py-spiffe's generated classes (protobuf's own parser).

    message X509SVIDResponse { repeated X509SVID svids = 1; repeated bytes crl = 2;
                               map<string, bytes> federated_bundles = 3; }
    message X509SVID { string spiffe_id = 1; bytes x509_svid = 2; bytes x509_svid_key = 3; bytes bundle = 4;
                       string hint = 5; }
    message X509BundlesResponse { repeated bytes crl = 1; map<string, bytes> bundles = 2; }
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# gRPC method paths: workload.proto declares no package, so the service's full name is its bare name
SERVICE = "SpiffeWorkloadAPI"
FETCH_X509_SVID = "FetchX509SVID"
FETCH_X509_BUNDLES = "FetchX509Bundles"
FETCH_JWT_SVID = "FetchJWTSVID"
FETCH_JWT_BUNDLES = "FetchJWTBundles"
VALIDATE_JWT_SVID = "ValidateJWTSVID"

_LENGTH_DELIMITED = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited field (bytes, string, embedded message, map entry); proto3 omits empty scalars."""
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(payload)) + payload


def _optional(number: int, payload: bytes) -> bytes:
    return _field(number, payload) if payload else b""


def _map(number: int, entries: Mapping[str, bytes]) -> bytes:
    """A map<string, bytes>: one entry message (key = 1, value = 2) per key, in key order (stable bytes)."""
    return b"".join(_field(number, _optional(1, key.encode()) + _optional(2, entries[key])) for key in sorted(entries))


@dataclass(frozen=True)
class X509Svid:
    spiffe_id: str
    chain_der: bytes  # the leaf first, then intermediates, concatenated DER
    key_pkcs8_der: bytes
    bundle_der: bytes  # the roots of the SVID's own trust domain, concatenated DER

    def encode(self) -> bytes:
        return (_optional(1, self.spiffe_id.encode()) + _optional(2, self.chain_der)
                + _optional(3, self.key_pkcs8_der) + _optional(4, self.bundle_der))


def x509_svid_response(svids: Iterable[X509Svid], crls: Iterable[bytes], federated: Mapping[str, bytes]) -> bytes:
    return (b"".join(_field(1, s.encode()) for s in svids) + b"".join(_field(2, c) for c in crls)
            + _map(3, federated))


def x509_bundles_response(bundles: Mapping[str, bytes], crls: Iterable[bytes]) -> bytes:
    return b"".join(_field(1, c) for c in crls) + _map(2, bundles)

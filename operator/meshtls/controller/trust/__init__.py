"""Trust domains at run time: which one an identity uses and its CAs (registry), the CA rotation (rotation),
revocations and CRL signing, batched (revocation), the bundle ConfigMaps (bundles), the CA state Secret (state),
what each reports (status), and what it reads beside its state: a brought CA, federated bundles (sources).
`registry.TrustDomains` is the one entry point; `domain` holds the runtime record.
"""

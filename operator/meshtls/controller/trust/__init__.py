"""Trust domains at run time: which one an identity uses and its CAs (registry), the CA rotation (rotation),
revocations and CRL signing, batched (revocation), the bundle ConfigMaps (bundles), the CA state Secret (state),
and what each reports (status). `registry.TrustDomains` is the one entry point; `domain` holds the runtime record.
"""

"""The decisions: when to issue, renew, revoke. Small pure checks with an injected clock, no cluster."""

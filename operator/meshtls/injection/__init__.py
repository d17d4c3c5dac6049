"""The operator's side of injection: the admission review and its JSON patch (admission, inject), what a pod is
dressed with (target, render), the in-memory index the webhook answers from (targets) and its HTTPS server (webhook).
Imports nothing of the proxy: what both sides share is `meshtls.dataplane`.
"""

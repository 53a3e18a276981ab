"""clave-kbs: a key broker speaking Confidential Containers' KBS protocol (RCAR), built on Clave's verifiers.

- :mod:`clave.kbs.client` — ``fetch_resource``: the guest side (stdlib + cryptography + joserfc only).
- :mod:`clave.kbs.server` — the broker (Starlette app served by uvicorn over HTTPS).
- :mod:`clave.kbs.cli` — ``clave-kbs serve|keygen|put-resource|delete-resource|set-policy|get-policy``.
- :mod:`clave.kbs.protocol` — the wire facts both sides share.

Importing this package imports nothing else: the client runs inside a container's init, where every import costs.
"""

"""clave-relay (the inclavared role) and the verifier's client for it (the shelter role).

- :mod:`clave.relay.protocol`: the wire messages and what a container's report data binds (no runtime imports);
- :mod:`clave.relay.server`: the relay, serving the node's enclave containers' evidence over attested TLS;
- :mod:`clave.relay.main`: the ``clave-relay`` command;
- :mod:`clave.relay.client`: ``verify_remote``, used by ``clave-verify remote`` (no runtime imports).

Nothing is imported here, so that the verifier's side never loads the runtime.
"""

"""Enclave containers: enclave runtimes driven through the Enclave Runtime PAL API (Inclavare's rune model)."""

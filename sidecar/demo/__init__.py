"""`tollway dev`, the local demo: embedded Valkey, the sidecar, the companion
and a real Envoy in front of a demo upstream.

command.py is the command, processes.py starts the processes (the tests and
the bench reuse it through tests/harness.py), upstream.py is the demo API.
envoy.yaml and tollway.toml are deploy/'s files, shipped as package data.
`tollway serve` and `tollway webhook` never import this package.
"""

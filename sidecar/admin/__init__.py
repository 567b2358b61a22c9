"""The admin API: what a merchant's own backend calls to manage accounts, keys,
usage and credits, authenticated by admin tokens with scopes.

    scopes.py      the scopes, and which operation needs which (pure)
    operations.py  the operations, one place for both transports
    grpc_api.py    tollway.admin.v1 over gRPC, on the sidecar
    (webhook/admin_api.py serves the same operations as JSON on the companion)
"""

"""The Stripe companion: the one process that talks to Stripe.

Until Stripe sync lands it serves only /healthz.
"""

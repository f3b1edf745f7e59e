"""Generated gRPC stubs for ``rarechange.v1`` (``make proto``; do not edit by hand)."""

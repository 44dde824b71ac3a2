"""The wire vocabulary every gpunexus peer and the hub share.

Nothing in here imports another gpunexus package: node/ and hub/ meet only on
the wire, and this package is the whole of what they agree on: message
classes, their msgpack framing, Ed25519 signatures over a canonical encoding,
peer ids, money units and hard limits.
"""

"""One exception for every way a peer can send us something unusable."""


class ProtocolError(ValueError):
    """A frame or message that does not follow the protocol.

    Raised for oversize frames, malformed msgpack, unknown message types or
    versions, missing or mistyped fields, out-of-range values and bad
    signatures. Callers answer it with an error message or close the stream;
    it never takes a peer down.
    """

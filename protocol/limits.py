"""Hard limits that bound what a peer must accept from another.

Every one of them is checked on decode, before any work is done, so a hostile
peer costs us at most one frame's worth of memory.
"""

PROTOCOL_VERSION = 1

MAX_FRAME_BYTES = 4 * 1024 * 1024
"""Largest frame on any gpunexus stream: a long prompt fits, a memory bomb does not."""

MAX_PROMPT_CHARS = 1_000_000
MAX_MESSAGES = 1024
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_TOKENS = 1_000_000
MAX_NAME_CHARS = 256
MAX_ADDRS = 16
MAX_CHUNK_TOKENS = 4096
MAX_TEXT_CHARS = 1_000_000
MAX_COMMITMENT_BYTES = 1_000_000
MAX_LOGIT_BIAS = 1024

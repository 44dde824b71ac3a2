"""Honesty: the reference model, its tokenizer and the seeded sampler.

The reference model is a small numpy transformer whose weights anyone can
rebuild from a seed. It is the embedded inference backend for the demo and the
tests, and the verifier's scorer: hosts sample with ``sampler`` so that
``generate.replay`` can recompute, in one prefill, the token each position had
to be. Import the modules you need (``verify.registry.load_reference`` for
the shared default model); this package imports nothing heavy on its own.
"""

"""Test-wide settings."""

from hypothesis import settings

# Property tests assert behaviour, never speed: a loaded 2-core CI machine must
# not turn a slow example into a failure.
settings.register_profile("gpunexus", deadline=None)
settings.load_profile("gpunexus")

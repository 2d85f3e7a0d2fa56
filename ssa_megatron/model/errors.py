"""The error a user's model settings raise: its own module, so that tools which only read or
convert checkpoints do not import megatron-core to catch it."""


class ConfigError(ValueError):
    """A setting the user chose cannot work; the message says what to change."""

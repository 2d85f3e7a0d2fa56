"""The error every mistake a user can make raises. Its message is one line that says what to
change; every command-line tool prints it as ``error: ...`` and exits 2 without losing anything
already saved. Areas subclass it (CorpusError, CheckpointError, ConversionError, EvalError), so
a tool catches this one. It lives apart so that tools which only read or convert checkpoints
do not import megatron-core to catch it."""


class ConfigError(ValueError):
    """A setting the user chose cannot work; the message says what to change."""

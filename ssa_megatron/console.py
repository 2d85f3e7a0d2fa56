"""What a person sees in the terminal: library notices they cannot act on are hidden, long waits
are announced, and every command-line tool shares one help layout.

:func:`quiet_library_notices` runs when ``ssa_megatron`` is imported (before megatron-core or
DeepSpeed are), so every entry point gets it without calling anything. It hides

* megatron-core's import-time fallbacks ("Transformer Engine and Apex are not installed", "Apex is
  not installed. Falling back to Torch Norm"): this package builds its layers from megatron-core's
  local (PyTorch) modules and needs neither library;
* megatron-core's "full scope is deprecated" about ``cuda_graph_scope``, whose default it is;
* DeepSpeed's "Setting accelerator to CPU" (the CPU is chosen on purpose when there is no GPU) and
  the "... built successfully" line it prints on every start of every process.

Anything else (our own log lines, other warnings) is untouched. ``SSA_SHOW_LIBRARY_NOTICES=1`` or
any ``python -W`` option leaves Python's warning filters and DeepSpeed's logger as they are.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import textwrap
import time
import warnings
from typing import Optional

# (category, message regex) of warnings that say nothing the user can act on
_HIDDEN_WARNINGS = (
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"Apex is not installed"),
    (UserWarning, r"full scope is deprecated"),
)
_HIDDEN_DEEPSPEED_LOGS = ("Setting accelerator to CPU",)


class _DropMessages(logging.Filter):
    def __init__(self, fragments):
        super().__init__()
        self.fragments = tuple(fragments)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def notices_wanted() -> bool:
    """True when the user asked to see every library notice."""
    return os.environ.get("SSA_SHOW_LIBRARY_NOTICES", "") not in ("", "0") or bool(sys.warnoptions)


def quiet_library_notices() -> None:
    """Install the filters described in the module docstring (idempotent)."""
    if notices_wanted():
        return
    for category, pattern in _HIDDEN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category)
    # DeepSpeed's logger is a named singleton: a filter added before deepspeed configures it stays
    ds_logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropMessages) for f in ds_logger.filters):
        ds_logger.addFilter(_DropMessages(_HIDDEN_DEEPSPEED_LOGS))


@contextlib.contextmanager
def announce_deepspeed_build(build_dir: Optional[str]):
    """Around ``deepspeed.init_distributed``: on the CPU, DeepSpeed compiles its shared-memory
    communication op (in ``build_dir``, ``build_lock.deepspeed_cpu_op_build_dir()``; None: no
    such op) the first time it runs on a machine (about a minute, silent). Say so before it
    starts and how long it took; swallow the "built successfully" line it prints every time."""
    built = build_dir is None or os.path.exists(
        os.path.join(build_dir, os.path.basename(build_dir) + ".so"))
    speaks = os.environ.get("LOCAL_RANK", "0") == "0"
    start = time.time()
    if not built and speaks:
        print(f"building DeepSpeed's CPU communication op (first run on this machine only, about "
              f"a minute; cached in {build_dir}) ...", flush=True)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(sys.stdout if notices_wanted() else captured):
            yield
    finally:
        for line in captured.getvalue().splitlines():
            if not line.endswith("built successfully"):
                print(line, flush=True)
    if not built and speaks:
        print(f"built DeepSpeed's CPU communication op in {time.time() - start:.0f} s", flush=True)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default after its help (not for required flags, switches, whose help says
    what they turn on or off, or defaults of None, whose help says what happens instead);
    descriptions and epilogs keep their line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("%(default)" in text or "(default" in text or action.required or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS
                or isinstance(action, argparse._StoreConstAction)  # store_true / store_false
                or not action.option_strings):
            return text
        default = action.default
        if isinstance(default, (list, tuple)):
            default = " ".join(str(v) for v in default)
        return f"{text} (default: {str(default).replace('%', '%%')})".lstrip()

    def _split_lines(self, text, width):
        # flag names stay whole ("--num-attention-heads", not "--num-" / "attention-heads")
        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width,
                             break_on_hyphens=False)


def record_for_launcher(line: str) -> None:
    """Under torchrun (which gives each process a ``TORCHELASTIC_ERROR_FILE``), write ``line`` as
    this process's error, so the failure summary torchrun prints last names the cause instead of
    a pointer to its documentation. Elsewhere, and if the file cannot be written: nothing."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json
    error = {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}
    try:
        with open(path, "w") as f:
            json.dump({"message": error}, f)
    except OSError:
        pass


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the shared help layout and without prefix matching (a misspelt
    ``--num-layer`` is an error, not ``--num-layers``), as Megatron-LM's. Sub-commands made with
    ``add_subparsers().add_parser`` are of this class too, so they inherit both."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        self._argv = list(sys.argv[1:] if args is None else args)  # for error()
        return super().parse_known_args(args, namespace)

    def error(self, message):
        """One line, with the closest flag for a misspelt one, instead of the whole usage block
        (dozens of lines for the trainer) above the message. A misspelt required flag
        (``--seq-len``) is named as the unknown flag it is, not as a missing one."""
        import difflib
        hints = []
        parsers = [self] + [p for a in self._actions if isinstance(a, argparse._SubParsersAction)
                            for p in a.choices.values()]  # a sub-command's flags too
        flags = sorted({s for p in parsers for s in p._option_string_actions if s.startswith("--")})
        if message.startswith("the following arguments are required:"):
            unknown = [w for w in getattr(self, "_argv", []) if w.startswith("--") and w != "--"
                       and w.split("=")[0] not in flags]
            if unknown:
                message = f"unrecognized arguments: {' '.join(unknown)}"
        if message.startswith("unrecognized arguments:"):
            for word in message.split(":", 1)[1].split():
                if word.startswith("--"):
                    close = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.75)
                    if close:
                        hints.append(f"{word}: did you mean {close[0]}?")
        hint = f" ({'; '.join(hints)})" if hints else ""
        line = f"{self.prog}: error: {message}{hint}; see {self.prog} --help"
        record_for_launcher(line)
        self.exit(2, line + "\n")


def make_parser(**kwargs) -> argparse.ArgumentParser:
    return ArgumentParser(**kwargs)

"""``tgi-streamer-launcher``: the "launcher flag" TGI's Rust launcher does not have.

    tgi-streamer-launcher --load-format streamer [--streamer-OPTION VALUE ...] [--] ARGS...

strips its own flags, sets the environment and execs ``text-generation-launcher ARGS...``.
TGI's launcher passes its whole environment to ``download-weights`` and to every shard, where
the ``.pth`` hook (:mod:`.hook`) reads it:

* ``--load-format streamer`` sets ``TGI_LOAD_FORMAT=streamer``; ``--load-format safetensors``
  (TGI's own loading) removes it. Without the flag the environment is left as it is.
* ``--streamer-weights-uri URI`` sets ``TGI_STREAMER_WEIGHTS_URI``; ``--streamer-FIELD VALUE``
  sets ``TGI_STREAMER_FIELD`` for each StreamerConfig field (``--streamer-concurrency 16``,
  ``--streamer-memory-limit 4GiB``, ``--streamer-direct-io off``...). ``--flag=value`` works too.
* ``--`` ends the wrapper's flags: everything after it goes to TGI untouched.
* ``--streamer-help`` prints this help.

Options are validated before the exec, so a typo fails here and not in every shard.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Mapping, Sequence

from ..config import StreamerConfig
from ..errors import ConfigError
from .settings import LOAD_FORMAT_ENV, LOAD_FORMAT_STREAMER, env_name, settings_from_env

TGI_LAUNCHER = "text-generation-launcher"
LOAD_FORMATS = (LOAD_FORMAT_STREAMER, "safetensors")
_STREAMER_FLAG = "--streamer-"


class UsageError(Exception):
    """Bad wrapper arguments (exit status 2)."""


def _option_keys() -> list[str]:
    return ["weights_uri", *StreamerConfig.allowed_keys()]


def _flag(key: str) -> str:
    return _STREAMER_FLAG + key.replace("_", "-")


def usage() -> str:
    flags = "\n".join(f"  {_flag(k)} VALUE   -> {env_name(k)}" for k in _option_keys())
    return (f"usage: tgi-streamer-launcher --load-format {{{','.join(LOAD_FORMATS)}}} [--streamer-OPTION VALUE ...] "
            f"[--] TEXT_GENERATION_LAUNCHER_ARGS...\n\n"
            f"Sets the environment and execs {TGI_LAUNCHER} with the remaining arguments.\n"
            f"  --load-format streamer     -> {LOAD_FORMAT_ENV}=streamer (safetensors: TGI's own loader)\n"
            f"{flags}\n  --streamer-help            this help\n")


def parse_args(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """Split ``argv`` (without the program name) into the environment for TGI and TGI's arguments."""
    env = dict(environ)
    rest: list[str] = []
    load_format: str | None = None
    options: dict[str, str] = {}
    keys = {k.replace("_", "-"): k for k in _option_keys()}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i + 1:])
            break
        name, eq, inline = arg.partition("=")
        if name == "--load-format" or name.startswith(_STREAMER_FLAG):
            if name == "--streamer-help":
                raise UsageError("")
            if eq:
                value = inline
            elif i + 1 < len(args):
                value = args[i + 1]
                i += 1
            else:
                raise UsageError(f"{name} needs a value")
            if name == "--load-format":
                if value not in LOAD_FORMATS:
                    raise UsageError(f"--load-format {value!r}: choose one of {', '.join(LOAD_FORMATS)}")
                load_format = value
            else:
                key = keys.get(name[len(_STREAMER_FLAG):])
                if key is None:
                    raise UsageError(f"unknown option {name}; streamer options: "
                                     f"{', '.join(_flag(k) for k in _option_keys())}")
                options[key] = value
        else:
            rest.append(arg)
        i += 1
    if load_format == LOAD_FORMAT_STREAMER:
        env[LOAD_FORMAT_ENV] = LOAD_FORMAT_STREAMER
    elif load_format is not None:
        env.pop(LOAD_FORMAT_ENV, None)
        if options:
            raise UsageError(f"--streamer-* options need --load-format streamer, not {load_format}")
    for key, value in options.items():
        env[env_name(key)] = value
    if env.get(LOAD_FORMAT_ENV, "").strip().lower() == LOAD_FORMAT_STREAMER:
        try:
            settings_from_env(env)
        except ConfigError as exc:
            raise UsageError(str(exc)) from exc
    return env, rest


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        sys.stderr.write(usage())
        return 2
    try:
        env, rest = parse_args(args, os.environ)
    except UsageError as exc:
        if str(exc):
            sys.stderr.write(f"tgi-streamer-launcher: {exc}\n\n{usage()}")
            return 2
        sys.stdout.write(usage())
        return 0
    program = shutil.which(TGI_LAUNCHER, path=env.get("PATH", os.defpath))
    if program is None:
        sys.stderr.write(f"tgi-streamer-launcher: {TGI_LAUNCHER} not found on PATH; run inside a TGI 3.x image "
                         f"(ghcr.io/huggingface/text-generation-inference) or install TGI's launcher\n")
        return 127
    if env.get(LOAD_FORMAT_ENV, "").strip().lower() == LOAD_FORMAT_STREAMER:
        from .hook import installed_pth_paths

        if not installed_pth_paths():
            sys.stderr.write("tgi-streamer-launcher: warning: loader_plugins_tgi.pth is not in this Python's "
                             "site-packages, so TGI's server will not load through the streamer; install "
                             "loader-plugins from a wheel into TGI's Python environment\n")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(program, [TGI_LAUNCHER, *rest], env)
    return 0  # not reached


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``tgi-streamer-launcher``: argument handling, and the exec of a stand-in
``text-generation-launcher`` that records its arguments and environment."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from loader_plugins.tgi_adapter.launcher import UsageError, main, parse_args

REPO = Path(__file__).resolve().parents[2]


def test_strips_its_flags_and_sets_the_environment():
    env, rest = parse_args(["--model-id", "/data/llama", "--load-format", "streamer", "--num-shard", "2",
                            "--streamer-concurrency", "16", "--streamer-memory-limit=4GiB",
                            "--streamer-weights-uri", "s3://bucket/llama/", "--port", "8080"], {"PATH": "/bin"})
    assert rest == ["--model-id", "/data/llama", "--num-shard", "2", "--port", "8080"]
    assert env == {"PATH": "/bin", "TGI_LOAD_FORMAT": "streamer", "TGI_STREAMER_CONCURRENCY": "16",
                   "TGI_STREAMER_MEMORY_LIMIT": "4GiB", "TGI_STREAMER_WEIGHTS_URI": "s3://bucket/llama/"}


def test_equals_form_and_double_dash():
    env, rest = parse_args(["--load-format=streamer", "--streamer-direct-io=off", "--", "--load-format", "x",
                            "--streamer-concurrency", "y"], {})
    assert env["TGI_LOAD_FORMAT"] == "streamer" and env["TGI_STREAMER_DIRECT_IO"] == "off"
    assert rest == ["--load-format", "x", "--streamer-concurrency", "y"]   # after --: TGI's, untouched


def test_safetensors_format_turns_the_streamer_off():
    env, rest = parse_args(["--load-format", "safetensors", "--model-id", "m"], {"TGI_LOAD_FORMAT": "streamer"})
    assert "TGI_LOAD_FORMAT" not in env and rest == ["--model-id", "m"]
    with pytest.raises(UsageError, match="need --load-format streamer"):
        parse_args(["--load-format", "safetensors", "--streamer-concurrency", "4"], {})


def test_environment_alone_is_kept_and_validated():
    env, _ = parse_args(["--model-id", "m"], {"TGI_LOAD_FORMAT": "streamer", "TGI_STREAMER_CONCURRENCY": "4"})
    assert env["TGI_LOAD_FORMAT"] == "streamer"
    with pytest.raises(UsageError, match="TGI_STREAMER_BOGUS"):
        parse_args(["--model-id", "m"], {"TGI_LOAD_FORMAT": "streamer", "TGI_STREAMER_BOGUS": "1"})


@pytest.mark.parametrize("argv,message", [
    (["--load-format", "gguf"], "--load-format 'gguf': choose one of streamer, safetensors"),
    (["--load-format"], "--load-format needs a value"),
    (["--load-format", "streamer", "--streamer-concurency", "4"], "unknown option --streamer-concurency; streamer "
                                                                  "options: --streamer-weights-uri, "
                                                                  "--streamer-concurrency"),
    (["--load-format", "streamer", "--streamer-concurrency", "many"], "environment variable TGI_STREAMER_CONCURRENCY='many': "),
    (["--load-format", "streamer", "--streamer-direct-io", "maybe"], "'direct_io'='maybe': must be one of auto, "
                                                                     "on, off"),
])
def test_bad_arguments(argv, message):
    with pytest.raises(UsageError) as info:
        parse_args(argv, {})
    assert message in str(info.value)


def test_usage_and_help(capsys):
    assert main([]) == 2
    assert "usage: tgi-streamer-launcher" in capsys.readouterr().err
    assert main(["--streamer-help"]) == 0
    out = capsys.readouterr().out
    assert "--streamer-concurrency VALUE   -> TGI_STREAMER_CONCURRENCY" in out
    assert main(["--load-format", "nope"]) == 2
    assert "choose one of" in capsys.readouterr().err


@pytest.fixture
def stand_in(tmp_path) -> tuple[Path, Path]:
    """A ``text-generation-launcher`` that writes its argv and TGI_* environment as JSON and exits 7."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "record.json"
    script = bindir / "text-generation-launcher"
    script.write_text(f"#!{sys.executable}\n"
                      "import json, os, sys\n"
                      f"json.dump({{'argv': sys.argv, 'env': {{k: v for k, v in os.environ.items() "
                      f"if k.startswith('TGI_')}}, 'pid': os.getpid()}}, open({str(record)!r}, 'w'))\n"
                      "sys.exit(7)\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bindir, record


def _run(args, bindir, extra_env=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TGI_")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.update(extra_env or {})
    code = "import sys, os; from loader_plugins.tgi_adapter.launcher import main; print(os.getpid(), flush=True); " \
           "sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60)


def test_execs_text_generation_launcher(stand_in):
    bindir, record = stand_in
    proc = _run(["--load-format", "streamer", "--streamer-concurrency", "8", "--model-id", "/data/m",
                 "--num-shard", "2"], bindir)
    assert proc.returncode == 7, proc.stderr           # the launcher's own exit status: we exec'd it
    got = json.loads(record.read_text())
    assert got["argv"][1:] == ["--model-id", "/data/m", "--num-shard", "2"]
    assert Path(got["argv"][0]).name == "text-generation-launcher"
    assert got["env"] == {"TGI_LOAD_FORMAT": "streamer", "TGI_STREAMER_CONCURRENCY": "8"}
    assert got["pid"] == int(proc.stdout.split()[0])  # same process: exec, not a child


def test_missing_launcher_is_reported(tmp_path):
    proc = _run(["--load-format", "streamer", "--model-id", "m"], tmp_path,
                {"PATH": str(tmp_path)})
    assert proc.returncode == 127
    assert "text-generation-launcher not found on PATH" in proc.stderr


def test_bad_option_never_execs(stand_in):
    bindir, record = stand_in
    proc = _run(["--load-format", "streamer", "--streamer-memory-limit", "lots", "--model-id", "m"], bindir)
    assert proc.returncode == 2
    assert "memory_limit" in proc.stderr and not record.exists()


def test_console_script_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'tgi-streamer-launcher = "loader_plugins.tgi_adapter.launcher:main"' in text

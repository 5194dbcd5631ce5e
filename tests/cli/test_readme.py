"""Every code snippet in README.md does what it says, as written.

* the setup block: `.ci/run` runs lines 1-2 (checked here to be the same lines); line 3, the
  main job, runs here on the real CIFAR-100 (slow; its results go to a temporary folder);
* the synopsis: every command and every `--option` it shows exists (`--help`);
* the Python snippet runs on a results folder.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"
runner = CliRunner()


def blocks() -> list[tuple[str, str, str]]:
    """(language, code, the line before the fence) of every fenced block."""
    text = (ROOT / "README.md").read_text()
    return [
        (m["lang"], m["code"], m["before"]) for m in re.finditer(r"(?P<before>[^\n]*)\n```(?P<lang>\w*)\n(?P<code>.*?)\n```", text, re.S)
    ]


def commands(code: str) -> list[str]:
    return [line.split("  #")[0].strip() for line in code.splitlines() if line.strip() and not line.startswith("#")]


def test_every_block_is_covered():
    langs = [lang for lang, _, _ in blocks()]
    assert langs.count("bash") == 1 and "python" in langs and "text" in langs
    assert set(langs) <= {"bash", "python", "text"}  # a new kind of snippet needs a check here


def setup_block() -> list[str]:
    (code,) = [code for lang, code, before in blocks() if lang == "bash" and "readme-test" in before]
    return commands(code)


def test_ci_runs_the_readme_install_and_test_lines():
    ci = (ROOT / ".ci" / "run").read_text()
    install, tests, _ = setup_block()
    assert install in ci and tests in ci


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "data" / "cifar-100-python").exists(), reason="../shared/data absent")
def test_readme_main_job_runs(tmp_path):
    main_job = setup_block()[2]
    argv = shlex.split(main_job)
    assert argv[:2] == ["fedame-bench", "run"] and argv[-2] == "--out"
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "bench", *argv[1:-1], str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    said = " ".join((proc.stdout + proc.stderr).split())  # the console may write to either, wrapped
    assert proc.returncode == 0, said[-3000:]
    assert "6 runs completed now, 0 skipped or failed" in said
    assert len(list((out / "summary").glob("*.parquet"))) == 6


def test_synopsis_commands_and_options_exist():
    from bench.loader import load_config

    code = "\n".join(code for lang, code, _ in blocks() if lang == "text")
    helps: dict[str, str] = {}
    for line in commands(code):
        argv = shlex.split(line.replace("[", " ").replace("]", " "))
        assert argv[0] == "fedame-bench", line
        cmd = argv[1]
        if cmd not in helps:
            res = runner.invoke(app, [cmd, "--help"], terminal_width=200)
            assert res.exit_code == 0, (line, res.output)
            helps[cmd] = res.output
        for opt in (a for a in argv[2:] if a.startswith("-")):
            assert opt.split("=")[0] in helps[cmd], (line, opt)
        overrides = [b for a, b in zip(argv, argv[1:]) if a == "--set"]
        load_config("smoke", overrides)  # every --set a README line shows is a valid key and value


def test_python_snippet_runs_on_a_results_folder(tmp_path):
    res = runner.invoke(app, ["run", "--config", "smoke", "--methods", "fedavg,fedncm", "--out", str(tmp_path / "results")])
    assert res.exit_code == 0, res.output
    (code,) = [code for lang, code, _ in blocks() if lang == "python"]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "fedncm" in proc.stdout and "fedavg" in proc.stdout

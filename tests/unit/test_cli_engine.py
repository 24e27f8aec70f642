"""`spectutor generate --drafter ...` runs the engine: same text whatever the drafter; bad values are named."""
from __future__ import annotations

import pytest

from spectutor.cli import main

ARGS = ["generate", "--prompt", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n", "--raw",
        "--max-new-tokens", "24"]


@pytest.mark.slow
def test_generate_gives_the_same_text_with_every_drafter(capsys):
    texts = {}
    for drafter in ("none", "hybrid", "draft-lm"):
        assert main(ARGS + ["--drafter", drafter, "--draft-layers", "2", "--stats"]) == 0
        out = capsys.readouterr()
        texts[drafter] = out.out
        assert f"drafter {drafter}" in out.err and "tokens/s" in out.err
    assert texts["none"].strip() and texts["none"] == texts["hybrid"] == texts["draft-lm"]


@pytest.mark.parametrize("flag,value,message", [("--speculation", "lots", "--speculation"),
                                                ("--drafter", "medusa", "invalid choice: 'medusa'")])
def test_bad_drafter_flags_are_named(capsys, flag, value, message):
    with pytest.raises(SystemExit) as exc:
        main(ARGS + [flag, value])
    assert exc.value.code == 2 and message in capsys.readouterr().err

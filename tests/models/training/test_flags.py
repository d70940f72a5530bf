"""Tests of models/training/flags.py: flags generated from a config dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from models.training import build_parser, option


@dataclass(frozen=True)
class Settings:
    steps: int = option(10, "steps in all")
    rate: float | None = option(None, "a rate")
    mode: Literal["exact", "estimate"] | None = option(None, "a mode")
    fast: bool = option(False, "go fast")
    out: str | None = option(None, "where")


def test_each_field_is_a_flag_of_its_type_and_only_given_flags_appear() -> None:
    parser = build_parser(Settings, "about", "after")
    given = vars(parser.parse_args(["--steps", "3", "--rate", "0.5", "--mode", "estimate", "--no-fast"]))
    assert given == {"steps": 3, "rate": 0.5, "mode": "estimate", "fast": False}
    assert vars(parser.parse_args([])) == {}
    text = " ".join(parser.format_help().split())
    assert "--steps N steps in all (default: 10)" in text and "--out DIR where (default: None)" in text
    assert "--mode {exact,estimate} a mode (default: None)" in text and text.endswith("after")


def test_a_value_outside_the_choices_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser(Settings, "", "").parse_args(["--mode", "gradient"])
    assert "argument --mode: invalid choice: 'gradient' (choose from" in capsys.readouterr().err

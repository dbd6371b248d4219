from dataclasses import dataclass

import pytest

from pipeline.cli import stage_main
from pipeline.config import build_config, read_params_section, require_paths, setting
from pipeline.errors import UserError


@dataclass(frozen=True)
class ExampleConfig:
    out: str = setting("", "output path")
    epochs: int = setting(80, "epochs")
    learning_rate: float = setting(1e-5, "rate")
    normalise: bool = setting(False, "a flag")
    classes: tuple[str, ...] = setting(("VCD", "GC"), "labels")


def parse(argv: list[str]) -> ExampleConfig:
    return stage_main(
        ExampleConfig,
        lambda config: config,
        prog="t",
        section="example",
        description="d",
        examples="  t",
        argv=argv,
    )


def test_precedence_defaults_then_params_then_flags(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("example:\n  epochs: 5\n  learning_rate: 0.001\n", encoding="utf-8")
    config = parse(["--params", str(params), "--epochs", "7"])
    assert config.epochs == 7  # flag beats params.yaml
    assert config.learning_rate == pytest.approx(0.001)  # params.yaml beats the default
    assert config.classes == ("VCD", "GC")  # default kept


def test_unknown_params_key_lists_valid_keys():
    with pytest.raises(UserError, match="unknown key.*epoch_count.*valid keys are classes, epochs"):
        build_config(ExampleConfig, {"epoch_count": 3}, "params.yaml")


def test_bool_is_parsed_strictly():
    assert parse(["--normalise", "false"]).normalise is False
    assert build_config(ExampleConfig, {"normalise": "yes"}, "x").normalise is True
    with pytest.raises(UserError, match="expected true or false"):
        build_config(ExampleConfig, {"normalise": "maybe"}, "x")
    with pytest.raises(SystemExit) as exit_info:
        parse(["--normalise", "maybe"])
    assert exit_info.value.code == 2


def test_wrong_type_in_params_is_a_user_error():
    with pytest.raises(UserError, match="epochs: expected int"):
        build_config(ExampleConfig, {"epochs": "many"}, "x")


def test_missing_section_names_the_sections(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("other: {}\n", encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        parse(["--params", str(params)])
    assert exit_info.value.code == 2
    assert "no section 'example'; sections present: other" in capsys.readouterr().err


def test_required_paths():
    with pytest.raises(UserError, match="--out"):
        require_paths(ExampleConfig(), "out")
    require_paths(ExampleConfig(out="x"), "out")


def test_dotted_section_reads_a_section_of_a_group(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(
        "example: {epochs: 1}\ngroup:\n  first: {epochs: 5}\n  second: {}\n", encoding="utf-8"
    )
    assert parse(["--params", str(params), "--section", "group.first"]).epochs == 5
    assert parse(["--params", str(params), "--section", "group.second"]).epochs == 80
    assert read_params_section(params, "group.first") == {"epochs": 5}


@pytest.mark.parametrize("section", ["group.third", "group.first.epochs", "nothing.first"])
def test_missing_dotted_section_lists_the_sections_as_dotted_names(tmp_path, capsys, section):
    params = tmp_path / "params.yaml"
    params.write_text("example: {}\ngroup:\n  first: {epochs: 5}\n  second: {}\n", "utf-8")
    with pytest.raises(SystemExit) as exit_info:
        parse(["--params", str(params), "--section", section])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error == (
        f"error: {params} has no section '{section}'; "
        "sections present: example, group.first, group.second\n"
    )


def test_a_group_is_not_a_section(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("group:\n  first: {epochs: 5}\n  second: {}\n", encoding="utf-8")
    with pytest.raises(UserError, match="'group' is a group of sections; pass one of group.first"):
        read_params_section(params, "group")

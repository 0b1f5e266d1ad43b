"""Settings: defaults < fermi.toml < environment; bad values are clear errors."""

import pytest

from fermi.errors import InvalidRequest
from fermi.settings import load_settings


def test_defaults_match_the_original():
    s = load_settings({})
    assert s.model == "Qwen/Qwen3-1.7B"
    assert s.openai_addr == "127.0.0.1:8000" and s.grpc_addr == "127.0.0.1:50051"  # loopback


def test_env_overrides_file(tmp_path):
    config = tmp_path / "fermi.toml"
    config.write_text('model = "from-file"\nengine_pool = 3\nsession_max = 7\n')
    s = load_settings({"FERMI_CONFIG": str(config), "FERMI_ENGINE_POOL": "2"})
    assert (s.model, s.engine_pool, s.session_max) == ("from-file", 2, 7)


@pytest.mark.parametrize("var", ["FERMI_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_from_either_variable(var):
    assert load_settings({var: "1"}).offline is True


@pytest.mark.parametrize(
    "env",
    [
        {"FERMI_ENGINE_POOL": "many"},
        {"FERMI_DISABLE_THINK": "maybe"},
        {"FERMI_DEFAULT_THINKING": "sometimes"},
        {"FERMI_DEVICE": "tpu"},
        {"FERMI_CONFIG": "/nonexistent/fermi.toml"},
    ],
)
def test_bad_values_are_clear_errors(env):
    with pytest.raises(InvalidRequest):
        load_settings(env)


def test_unknown_key_in_file(tmp_path):
    config = tmp_path / "fermi.toml"
    config.write_text("modle = 'typo'\n")
    with pytest.raises(InvalidRequest, match="modle"):
        load_settings({"FERMI_CONFIG": str(config)})


def test_spinning_threads_are_opt_in():
    from fermi.engine import session_options

    assert load_settings({}).spin is False
    assert load_settings({"FERMI_SPIN": "on"}).spin is True
    entry = "session.intra_op.allow_spinning"
    assert session_options(2).get_session_config_entry(entry) == "0"
    assert session_options(2, spin=True).get_session_config_entry(entry) == "1"

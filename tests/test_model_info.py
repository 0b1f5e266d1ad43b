"""The small decisions behind the operator flags: names a model answers to, the context cap, the
new settings from the environment, and the beyond-loopback warning."""

from __future__ import annotations

import pytest

from fermi.errors import InvalidRequest
from fermi.exposure import exposure_warning
from fermi.model_info import capped_context, own_names
from fermi.settings import Settings, load_settings


def test_a_local_model_answers_to_its_full_path_and_folder(tmp_path):
    checkpoint = tmp_path / "my-model"
    checkpoint.mkdir()
    names = own_names(str(checkpoint), str(checkpoint) + "/")
    assert {str(checkpoint), str(checkpoint.resolve()), "my-model"} == set(names)
    assert own_names("Qwen/Qwen3-1.7B", "Qwen/Qwen3-1.7B") == ["Qwen/Qwen3-1.7B", "Qwen3-1.7B"]


def test_ctx_size_caps_and_never_raises_the_context():
    assert capped_context(4096, 0) == 4096
    assert capped_context(4096, 1024) == 1024
    with pytest.raises(InvalidRequest, match="larger than the model's context of 4096"):
        capped_context(4096, 8192)


def test_new_settings_from_the_environment():
    s = load_settings(
        {
            "FERMI_SERVED_MODEL_NAME": "a, b,,c",
            "FERMI_CTX_SIZE": "2048",
            "FERMI_LOG_FORMAT": "json",
        }
    )
    assert (s.served_names, s.ctx_size, s.log_format) == (["a", "b", "c"], 2048, "json")
    with pytest.raises(InvalidRequest, match="plain or json"):
        load_settings({"FERMI_LOG_FORMAT": "yaml"})
    with pytest.raises(InvalidRequest, match="does not exist"):
        load_settings({"FERMI_CHAT_TEMPLATE": "/nonexistent.jinja"})


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_no_warning_on_loopback(host):
    assert exposure_warning(host, Settings()) is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "example.org"])
def test_warning_beyond_loopback_without_a_key(host):
    assert "without an API key" in exposure_warning(host, Settings())
    assert exposure_warning(host, Settings(api_key="k")) is None

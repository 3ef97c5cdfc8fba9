"""--push-to-hub (fairy2i_jax.hf.hub): offline it is refused in one line before any work (no network here, so the
online upload itself is not exercised)."""

from fairy2i_jax.errors import Fairy2iError
from fairy2i_jax.export import main as export_main
from fairy2i_jax.hf.hub import HubError, check_online, hub_offline
from model_helpers import checkpoint


def test_offline_variables_are_read_at_call_time(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert hub_offline() is None
    check_online("org/x")  # no error while online
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert hub_offline() == "TRANSFORMERS_OFFLINE"
    try:
        check_online("org/x")
    except HubError as e:
        assert isinstance(e, Fairy2iError) and "org/x" in str(e)
    else:
        raise AssertionError("offline check_online did not raise")


def test_push_to_hub_offline_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    argv = ["--from", str(checkpoint("llama")), "--quant", "w2", "--format", "packed", "--out", str(out),
            "--push-to-hub", "org/tiny-w2"]
    capsys.readouterr()  # building the test checkpoint may print progress bars
    assert export_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "offline (HF_HUB_OFFLINE is set)" in err and "org/tiny-w2" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    argv[1] = str(tmp_path / "missing")  # the offline check comes before the source is even looked at
    assert export_main(argv) == 2
    assert "offline (TRANSFORMERS_OFFLINE is set)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

from pathlib import Path

from bucketer.localkafka import LocalKafka


def test_constructor_touches_nothing(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path / "never", port=1)
    assert not (tmp_path / "never").exists()
    st = broker.status()
    assert st.running is False and st.bootstrap == "127.0.0.1:1"


def test_stale_state_file_is_not_running(tmp_path: Path) -> None:
    (tmp_path / "broker.json").write_text('{"pid": 999999999, "port": 5, "controller_port": 6}')
    assert LocalKafka(tmp_path, port=5).status().running is False

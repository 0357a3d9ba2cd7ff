"""Podman set-up of deployment/containers/engine.py, without running apt-get."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "deployment" / "containers"))
import engine  # noqa: E402


@pytest.fixture
def fake_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put an apt-get on PATH that records its arguments, one call per line."""
    calls = tmp_path / "apt-calls"
    script = tmp_path / "bin" / "apt-get"
    script.parent.mkdir()
    script.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(script.parent))
    monkeypatch.setattr(engine.os, "geteuid", lambda: 0)
    return calls


def test_installs_only_missing_packages(
    fake_apt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    present = tmp_path / "netavark"
    present.touch()
    monkeypatch.setattr(
        engine,
        "APT_PACKAGES",
        {"netavark": str(present), "iptables": "no-such-iptables"},
    )

    engine.install_podman()

    assert fake_apt.read_text().splitlines() == [
        "update",
        "install -y --no-install-recommends iptables",
    ]


def test_nothing_installed_when_complete(
    fake_apt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    present = tmp_path / "netavark"
    present.touch()
    monkeypatch.setattr(engine, "APT_PACKAGES", {"netavark": str(present)})

    engine.install_podman()

    assert not fake_apt.exists()


def test_iptables_is_installed_with_podman() -> None:
    # netavark cannot start a container network without iptables.
    assert "iptables" in engine.APT_PACKAGES


def test_missing_packages_without_root_named(
    fake_apt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(
        engine, "APT_PACKAGES", {"iptables": "no-such-iptables", "runc": "no-runc"}
    )

    with pytest.raises(engine.EngineError) as error:
        engine.install_podman()

    assert "missing: iptables, runc" in str(error.value)
    assert "apt-get install iptables runc" in str(error.value)
    assert not fake_apt.exists()

"""The compose files' gateway service against ``zkv gateway``'s start-up checks: the
plaintext file's gateway (0.0.0.0 inside the network) says ``--insecure`` so it still
starts, and the secure override hands it its own key and the tokens file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from zkv.client.cli import build_parser
from zkv.gateway.main import check_security

yaml = pytest.importorskip("yaml", reason="PyYAML reads the compose files")

pytestmark = pytest.mark.unit

COMPOSE = Path(__file__).resolve().parents[2] / "compose"


def _service(name: str, file: str) -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / file).read_text())["services"][name]  # type: ignore[no-any-return]


def test_plaintext_compose_gateway_passes_the_non_loopback_check(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ZKV_KEYS", "ZKV_GATEWAY_TOKENS"):
        monkeypatch.delenv(name, raising=False)
    command = _service("gateway", "docker-compose.yml")["command"]
    assert command[0] == "zkv"
    args = build_parser().parse_args(command[1:])
    assert args.host == "0.0.0.0" and args.insecure
    assert check_security(args)[0] is None
    without = build_parser().parse_args([c for c in command[1:] if c != "--insecure"])
    assert "refusing to listen on 0.0.0.0" in str(check_security(without)[0])


def test_secure_compose_gateway_gets_its_key_and_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    service = _service("gateway", "docker-compose.secure.yml")
    assert "./keys:/keys:ro" in service["volumes"]
    for name, value in service["environment"].items():
        monkeypatch.setenv(name, value)
    command = _service("gateway", "docker-compose.yml")["command"]
    args = build_parser().parse_args(command[1:])
    assert args.keys_dir == "/keys/gateway"  # `zkv keys generate` writes keys/gateway/
    assert str(args.tokens) == "/keys/gateway/tokens"

"""pipeline.ray_session's connection errors: a cluster with token authentication refuses a command that
sends no token, and Ray says only "Failed to connect"; the error says what to set. No Ray needed: the
refusal is played by a stand-in for the ray module."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline import ray_session
from pipeline.ray_session import RaySetupError


class RefusingRay:
    """What `import ray` gives when the cluster at the address refuses the connection."""

    def is_initialized(self) -> bool:
        return False

    def init(self, **options):
        raise ConnectionError(f"Failed to connect to Ray cluster at {options.get('address')}")


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ray_session, "import_ray", RefusingRay)
    return tmp_path


def connect(address: str) -> str:
    with pytest.raises(RaySetupError) as caught:
        with ray_session.ray_session(address):
            pass
    return str(caught.value)


def test_a_refused_connection_with_a_token_file_names_ray_auth_mode(home, monkeypatch):
    assert "RAY_AUTH_MODE" not in connect("head:6379")  # no token anywhere: nothing to suggest
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("secret")
    message = connect("head:6379")
    assert len(message.splitlines()) == 1 and "Failed to connect" in message
    assert "auth_token" in message and "RAY_AUTH_MODE=token" in message, message
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # set, and still refused: something else is wrong
    assert "RAY_AUTH_MODE=token" not in connect("head:6379")


class AuthenticationError(Exception):
    """Stands for ray.exceptions.AuthenticationError (Ray >= 2.52), which is not a ConnectionError."""


class WrongTokenRay(RefusingRay):
    exceptions = SimpleNamespace(AuthenticationError=AuthenticationError)

    def init(self, **options):
        raise AuthenticationError("Token authentication failed: invalid token")


def test_a_wrong_token_is_one_line_not_a_traceback(home, monkeypatch):
    monkeypatch.setattr(ray_session, "import_ray", WrongTokenRay)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    message = connect("head:6379")
    assert message == "cannot connect to Ray at 'head:6379': Token authentication failed: invalid token"

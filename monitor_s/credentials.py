"""Per-agent credentials: what MonitorS's polls carry, so the poller and the agents share no secret.

Each agent gets its own bearer credential in the Register answer, and accepts no other once it
has one. The credential is derived, not stored: HMAC-SHA256 of the instance id and its row's
`registered_at` under a key only MonitorS reads (`<HELIX_STATE_DIR>/monitor/credential.key`,
0600, made on first start). So a restarted MonitorS, which resumes every row from the table,
polls every agent with the credential that agent already holds; a re-registration from a new
address starts a new row, and with it a new credential. One compromised instance learns its own
credential, which opens nothing but its own agent.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from shared.table import NotPrivate, check_private

KEY_BYTES = 32


class CredentialIssuer:
    def __init__(self, key: bytes):
        if len(key) < KEY_BYTES:
            raise ValueError(f"credential key: {len(key)} bytes, expected at least {KEY_BYTES}")
        self._key = key

    @classmethod
    def from_state_dir(cls, state_dir: str) -> CredentialIssuer:
        """Load the key, or make it (exclusively: two MonitorS starting at once agree on one).
        Raises NotPrivate for a key file another user owns or others may read."""
        folder = os.path.join(state_dir, "monitor")
        os.makedirs(folder, mode=0o700, exist_ok=True)
        path = os.path.join(folder, "credential.key")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            pass
        else:
            try:
                os.write(fd, os.urandom(KEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            check_private(fd, path, "credential key")
            key = os.read(fd, 4096)
        finally:
            os.close(fd)
        if len(key) < KEY_BYTES:
            raise NotPrivate(
                f"credential key {path} holds {len(key)} bytes, expected {KEY_BYTES}: remove it "
                "(agents get new credentials when they register again)"
            )
        return cls(key)

    def credential(self, instance_id: str, registered_at: float) -> str:
        message = f"{instance_id}\n{registered_at!r}".encode()
        return base64.urlsafe_b64encode(hmac.new(self._key, message, hashlib.sha256).digest()).decode().rstrip("=")

    def metadata(self, instance_id: str, registered_at: float) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.credential(instance_id, registered_at)}"),)

"""Plain views of the built-in objects meshtls reads (Secrets), shared by the kube layer and the decisions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from meshtls.api.constants import ANNOTATION_OWNER_UID, LABEL_MANAGED_BY, MANAGED_BY


@dataclass(frozen=True)
class SecretSnapshot:
    """A Secret as read from the API (or absent), with its data decoded."""

    exists: bool
    name: str = ""
    data: Mapping[str, bytes] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    owner_uids: tuple[str, ...] = ()
    resource_version: str | None = None
    uid: str | None = None

    @property
    def managed(self) -> bool:
        return self.labels.get(LABEL_MANAGED_BY) == MANAGED_BY

    def owned_by(self, uid: str) -> bool:
        """Ours only when labelled by meshtls AND owned by this very WorkloadIdentity (by uid)."""
        return self.managed and (uid in self.owner_uids or self.annotations.get(ANNOTATION_OWNER_UID) == uid)


ABSENT = SecretSnapshot(exists=False)

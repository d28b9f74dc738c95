from __future__ import annotations

from apps.accounts.models import Role, User

# Who may read the audit log, its exports, reports and dossiers.
AUDIT_READER_ROLES = (Role.ADMIN, Role.COMPLIANCE_OFFICER)


def audit_can_view(*, user: User) -> bool:
    return user.has_role(*AUDIT_READER_ROLES)

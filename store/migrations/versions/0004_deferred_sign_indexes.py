"""audit events: the sign path's entries in the filter indexes are filed a little later on
SQLite; the unused grant_id index of signing operations goes

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 02:40:00

On SQLite every sign batch commits its operations and their audit events in a transaction of
its own, and each index of those tables is one more page written to the WAL (and read back
after the other API process's commit) in every such transaction. The audit events' four filter
indexes (entity, actor, action, request) are now partial, `WHERE indexed = 1`, and the sign
path writes its events with `indexed = 0`. A thread in each API process (`store.deferred.Filer`)
files them once a second: `indexed = 1` for the events past the mark in `index_marks`, and the
mark moves past them, in transactions of up to 2,000 events. Pending events all lie past the
mark, so a filtered query reads the filed ones through the partial indexes and the few pending
ones through the sequence number (`store.deferred`). Every other writer, and everything on
PostgreSQL (whose indexes stay as they were), writes `indexed = 1`.

`ix_signing_operations_grant_id` is dropped on both databases: no query reads it.
"""

from alembic import op
import sqlalchemy as sa

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

EVENT_INDEXES = (
    ("ix_audit_events_entity", ["entity_type", "entity_id"]),
    ("ix_audit_events_actor_id", ["actor_id"]),
    ("ix_audit_events_action", ["action"]),
    ("ix_audit_events_request_id", ["request_id"]),
)


def _recreate(*, partial: bool) -> None:
    for name, columns in EVENT_INDEXES:
        op.drop_index(name, table_name="audit_events")
        if partial:
            op.create_index(name, "audit_events", columns, sqlite_where=sa.text("indexed = 1"))
        else:
            op.create_index(name, "audit_events", columns)


def upgrade() -> None:
    op.add_column("audit_events", sa.Column("indexed", sa.Integer(), nullable=False, server_default="1"))
    op.drop_index("ix_signing_operations_grant_id", table_name="signing_operations")
    op.create_table(
        "index_marks",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.execute("INSERT INTO index_marks (name, value) SELECT 'audit_events', COALESCE(MAX(seq), 0) FROM audit_events")
    if op.get_bind().dialect.name == "sqlite":
        _recreate(partial=True)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("UPDATE audit_events SET indexed = 1 WHERE indexed = 0")
        _recreate(partial=False)
    op.drop_table("index_marks")
    op.create_index("ix_signing_operations_grant_id", "signing_operations", ["grant_id"])
    with op.batch_alter_table("audit_events") as batch_op:
        batch_op.drop_column("indexed")

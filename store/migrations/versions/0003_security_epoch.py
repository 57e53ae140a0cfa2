"""security epoch: a counter bumped by any change to tokens, identities, signers, certificates
or signer memberships

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 18:05:00

The sign path keeps, per API process, the token and signer rows it last read and uses them while
this counter is unchanged: on SQLite it reads the counter once per batch instead of the rows; on
PostgreSQL `signgate_record_sign_batch` compares it in the statement that records the batch and
writes nothing if it moved (the caller then reads afresh and signs again). A trigger bumps it in
the same transaction as the change, so a revoked token, a removed member or a disabled signer is
refused from the next batch on, as when the rows were read for every batch.
"""

from alembic import op
import sqlalchemy as sa

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TABLES = ("api_tokens", "identities", "signers", "certificates", "signer_members")
OPERATIONS = ("INSERT", "UPDATE", "DELETE")

PG_BUMP = """
CREATE OR REPLACE FUNCTION signgate_bump_security_epoch() RETURNS trigger
LANGUAGE plpgsql AS $fn$
BEGIN
    UPDATE security_epoch SET value = value + 1 WHERE id = 1;
    RETURN NULL;
END
$fn$
"""

PG_CHECK = """
CREATE OR REPLACE FUNCTION signgate_record_sign_batch_at_epoch(p_batch jsonb, p_at timestamptz, p_epoch bigint)
RETURNS json
LANGUAGE plpgsql AS $fn$
BEGIN
    -- Reads of tokens, identities, signers, certificates and memberships that the caller made
    -- at another epoch may be stale: record nothing, the caller reads afresh.
    IF p_epoch IS NOT NULL AND p_epoch <> (SELECT value FROM security_epoch WHERE id = 1) THEN
        RETURN json_build_object('stale', true);
    END IF;
    RETURN signgate_record_sign_batch(p_batch, p_at);
END
$fn$
"""


def upgrade() -> None:
    op.create_table(
        "security_epoch",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute("INSERT INTO security_epoch (id, value) VALUES (1, 0)")
    if op.get_bind().dialect.name == "postgresql":
        op.execute(PG_BUMP)
        op.execute(PG_CHECK)
        for table in TABLES:
            op.execute(
                f"CREATE TRIGGER security_epoch_{table} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE "
                f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION signgate_bump_security_epoch()"
            )
    else:
        for table in TABLES:
            for operation in OPERATIONS:
                op.execute(
                    f"CREATE TRIGGER security_epoch_{table}_{operation.lower()} AFTER {operation} ON {table} "
                    "BEGIN UPDATE security_epoch SET value = value + 1 WHERE id = 1; END"
                )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in TABLES:
            op.execute(f"DROP TRIGGER IF EXISTS security_epoch_{table} ON {table}")
        op.execute("DROP FUNCTION IF EXISTS signgate_record_sign_batch_at_epoch(jsonb, timestamptz, bigint)")
        op.execute("DROP FUNCTION IF EXISTS signgate_bump_security_epoch()")
    else:
        for table in TABLES:
            for operation in OPERATIONS:
                op.execute(f"DROP TRIGGER IF EXISTS security_epoch_{table}_{operation.lower()}")
    op.drop_table("security_epoch")

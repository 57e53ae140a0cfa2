"""PostgreSQL: record a batch of sign attempts in one statement

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 17:40:00

`signgate_record_sign_batch(batch jsonb, at timestamptz)` does, on the server, what the sign path
did in two round trips with the grants and the audit head locked in between: it locks each
group's usable grants in the order they are spent and settles which attempts get an operation,
takes those operations, inserts the signing-operation rows, advances the audit chain (one event
per attempt, hashed with sha256 exactly as `store.audit.event_hash` does, from canonical text the
caller prepared around the values only the server knows) and keeps signatures on requests.
Called in autocommit, the locks are held only while the statement runs and commits. SQLite
does not need it: there the batch runs in-process under the database's write lock.

The batch (built by `store.fastsign._batch_document`):
  groups: [{signer_id, identity_id, grant_id (pinned or null), members: [attempt index]}],
          in the order their grants are locked;
  attempts: [{op: {id, signer_id, actor_id, signing_algorithm, data_sha256, ip_address,
                   client_metadata?: the caller's JSON as text, stored as sent},
              ev: {id, actor_id, actor_name, ip_address},
              h, d1, q: the event's canonical text between the action and the data, after the
                  grant id, and after the data,
              fixed?: {status, grant_id, request_id, error, error_json}: settled by the caller
                  (otherwise the attempt belongs to a group and is settled here),
              sig_req?, sig?: a signature to keep on a request if the attempt succeeds}],
  denied, denied_json: the error of an attempt denied here, as text and as JSON text;
  signatures?: present when some attempt carries a signature to keep.
Returns {"status": [...], "grant": [...], "request": [...]}, one entry per attempt.
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

FUNCTION = r"""
CREATE OR REPLACE FUNCTION signgate_record_sign_batch(p_batch jsonb, p_at timestamptz)
RETURNS json
LANGUAGE plpgsql
AS $fn$
DECLARE
    v_doc jsonb := p_batch;
    v_attempts jsonb := v_doc -> 'attempts';
    v_n int := jsonb_array_length(v_attempts);
    v_status text[] := array_fill(NULL::text, ARRAY[v_n]);
    v_grant text[] := array_fill(NULL::text, ARRAY[v_n]);
    v_request text[] := array_fill(NULL::text, ARRAY[v_n]);
    v_error text[] := array_fill(NULL::text, ARRAY[v_n]);
    v_error_json text[] := array_fill('null'::text, ARRAY[v_n]);
    v_seqs bigint[] := array_fill(NULL::bigint, ARRAY[v_n]);
    v_prevs text[] := array_fill(NULL::text, ARRAY[v_n]);
    v_hashes text[] := array_fill(NULL::text, ARRAY[v_n]);
    v_datas text[] := array_fill(NULL::text, ARRAY[v_n]);
    v_taken jsonb := '{}';
    v_group jsonb;
    v_members int[];
    v_want int;
    v_pos int;
    v_take int;
    v_before int;
    v_row record;
    v_a jsonb;
    v_i int;
    v_k int;
    v_m int;
    v_seq bigint;
    v_prev text;
    v_hash text;
    v_data text;
BEGIN
    FOR v_i IN 1 .. v_n LOOP
        v_a := v_attempts -> (v_i - 1);
        IF v_a -> 'fixed' IS NOT NULL THEN
            v_status[v_i] := v_a -> 'fixed' ->> 'status';
            v_grant[v_i] := v_a -> 'fixed' ->> 'grant_id';
            v_request[v_i] := v_a -> 'fixed' ->> 'request_id';
            v_error[v_i] := v_a -> 'fixed' ->> 'error';
            v_error_json[v_i] := v_a -> 'fixed' ->> 'error_json';
        END IF;
    END LOOP;

    -- Each group's usable grants, locked in the order they are spent; a grant that stopped
    -- matching while we waited for its lock is left out.
    FOR v_group IN SELECT value FROM jsonb_array_elements(v_doc -> 'groups') LOOP
        v_members := ARRAY(SELECT value::int FROM jsonb_array_elements_text(v_group -> 'members'));
        v_want := cardinality(v_members);
        v_pos := 0;
        FOR v_row IN
            SELECT g.id, g.request_id, g.allowed_sign_operations - g.used_sign_operations AS left_ops
            FROM grants g
            WHERE g.signer_id = v_group ->> 'signer_id' AND g.identity_id = v_group ->> 'identity_id'
              AND g.status = 'active' AND g.valid_from <= p_at AND g.valid_until > p_at
              AND g.used_sign_operations < g.allowed_sign_operations
              AND (v_group ->> 'grant_id' IS NULL OR g.id = v_group ->> 'grant_id')
            ORDER BY g.valid_until, g.id
            FOR UPDATE
        LOOP
            EXIT WHEN v_pos >= v_want;
            v_before := coalesce((v_taken ->> v_row.id)::int, 0);
            v_take := least(v_row.left_ops - v_before, v_want - v_pos);
            IF v_take > 0 THEN
                v_taken := jsonb_set(v_taken, ARRAY[v_row.id], to_jsonb(v_before + v_take));
                FOR v_k IN 1 .. v_take LOOP
                    v_m := v_members[v_pos + 1] + 1;
                    v_status[v_m] := 'success';
                    v_grant[v_m] := v_row.id;
                    v_request[v_m] := v_row.request_id;
                    v_pos := v_pos + 1;
                END LOOP;
            END IF;
        END LOOP;
        WHILE v_pos < v_want LOOP
            v_m := v_members[v_pos + 1] + 1;
            v_status[v_m] := 'denied';
            v_grant[v_m] := v_group ->> 'grant_id';
            v_error[v_m] := v_doc ->> 'denied';
            v_error_json[v_m] := v_doc ->> 'denied_json';
            v_pos := v_pos + 1;
        END LOOP;
    END LOOP;

    UPDATE grants g SET used_sign_operations = g.used_sign_operations + t.value::int,
        status = CASE WHEN g.used_sign_operations + t.value::int >= g.allowed_sign_operations
                      THEN 'exhausted' ELSE g.status END
    FROM jsonb_each_text(v_taken) AS t
    WHERE g.id = t.key;

    INSERT INTO signing_operations (id, at, signer_id, actor_id, status, signing_algorithm,
        data_sha256, grant_id, request_id, client_metadata, ip_address, error)
    SELECT x.a -> 'op' ->> 'id', p_at, x.a -> 'op' ->> 'signer_id', x.a -> 'op' ->> 'actor_id',
        v_status[x.i], x.a -> 'op' ->> 'signing_algorithm', x.a -> 'op' ->> 'data_sha256',
        v_grant[x.i], v_request[x.i], (x.a -> 'op' ->> 'client_metadata')::json,
        x.a -> 'op' ->> 'ip_address', v_error[x.i]
    FROM jsonb_array_elements(v_attempts) WITH ORDINALITY AS x(a, i);

    -- The audit head is the last lock taken.
    UPDATE audit_head SET seq = seq + v_n WHERE id = 1 RETURNING seq, hash INTO v_seq, v_prev;
    v_seq := v_seq - v_n;
    FOR v_i IN 1 .. v_n LOOP
        v_a := v_attempts -> (v_i - 1);
        v_seq := v_seq + 1;
        -- audit.event_hash's canonical text: keys sorted, no spaces, non-ASCII as is.
        v_data := '{"dataSha256":"' || (v_a -> 'op' ->> 'data_sha256') || '","error":'
            || v_error_json[v_i] || ',"grantId":' || coalesce(to_json(v_grant[v_i])::text, 'null')
            || (v_a ->> 'd1');
        v_hash := encode(sha256(convert_to(
            v_prev || '{"action":"signing_operation.' || v_status[v_i] || '",' || (v_a ->> 'h')
                || ',"data":' || v_data || (v_a ->> 'q') || ',"requestId":'
                || coalesce(to_json(v_request[v_i])::text, 'null') || ',"seq":' || v_seq || '}',
            'UTF8')), 'hex');
        v_seqs[v_i] := v_seq;
        v_prevs[v_i] := v_prev;
        v_hashes[v_i] := v_hash;
        v_datas[v_i] := v_data;
        v_prev := v_hash;
    END LOOP;
    INSERT INTO audit_events (id, seq, at, actor_id, actor_name, action, entity_type, entity_id,
        request_id, data, ip_address, prev_hash, hash)
    SELECT x.a -> 'ev' ->> 'id', v_seqs[x.i], p_at, x.a -> 'ev' ->> 'actor_id',
        x.a -> 'ev' ->> 'actor_name', 'signing_operation.' || v_status[x.i], 'signing_operation',
        x.a -> 'op' ->> 'id', v_request[x.i], v_datas[x.i]::json, x.a -> 'ev' ->> 'ip_address',
        v_prevs[x.i], v_hashes[x.i]
    FROM jsonb_array_elements(v_attempts) WITH ORDINALITY AS x(a, i);
    UPDATE audit_head SET hash = v_prev WHERE id = 1;

    IF v_doc ? 'signatures' THEN
        UPDATE signing_requests r SET signature = x.a ->> 'sig'
        FROM jsonb_array_elements(v_attempts) WITH ORDINALITY AS x(a, i)
        WHERE x.a ->> 'sig_req' IS NOT NULL AND v_status[x.i] = 'success' AND r.id = x.a ->> 'sig_req';
    END IF;

    RETURN json_build_object('status', v_status, 'grant', v_grant, 'request', v_request);
END
$fn$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS signgate_record_sign_batch(jsonb, timestamptz)")

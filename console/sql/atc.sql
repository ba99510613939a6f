-- atc's own schema. Everything atc writes lives here; it never alters the application's tables.
-- Idempotent: `atc db upgrade` runs this file in one transaction. It creates only objects in the
-- atc schema, so it takes no lock on the application's tables (no foreign keys into them either:
-- adding one would take a SHARE ROW EXCLUSIVE lock on the hot table it points at).

CREATE SCHEMA IF NOT EXISTS atc;

CREATE TABLE IF NOT EXISTS atc.schema_version (
    version     integer PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- Append-only audit trail. db_role and client_addr come from the server, not from the config
-- file, so an operator name alone cannot forge who acted.
CREATE TABLE IF NOT EXISTS atc.audit (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    operator     text NOT NULL,
    db_role      text NOT NULL DEFAULT current_user,
    client_addr  inet DEFAULT inet_client_addr(),
    action       text NOT NULL,
    targets      jsonb NOT NULL DEFAULT '[]',
    reason       text NOT NULL DEFAULT '',
    outcome      text NOT NULL,
    details      jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS audit_at ON atc.audit (at DESC);
CREATE INDEX IF NOT EXISTS audit_action ON atc.audit (action, at DESC);

-- Who and when come from the server even if an INSERT names them (a hand-written INSERT cannot
-- claim another role), and rows cannot be changed or deleted except by disabling the trigger,
-- which only the table's owner can do (and which shows in the server log when logged).
CREATE OR REPLACE FUNCTION atc.audit_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.db_role := current_user;
    NEW.client_addr := inet_client_addr();
    NEW.at := clock_timestamp();
    RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION atc.audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'atc.audit is append-only: % refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'atc.audit'::regclass AND tgname = 'audit_stamp') THEN
        CREATE TRIGGER audit_stamp BEFORE INSERT ON atc.audit FOR EACH ROW EXECUTE FUNCTION atc.audit_stamp();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = 'atc.audit'::regclass AND tgname = 'audit_append_only') THEN
        CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON atc.audit
            FOR EACH ROW EXECUTE FUNCTION atc.audit_append_only();
    END IF;
END $$;

-- Pauses are append-only events; the current state of an assignment is its latest event.
-- Writing here never touches "Assignment", so a pause commits even while its rows are locked.
CREATE TABLE IF NOT EXISTS atc.pause_event (
    id             bigserial PRIMARY KEY,
    assignment_id  integer NOT NULL,
    paused         boolean NOT NULL,
    operator       text NOT NULL,
    db_role        text NOT NULL DEFAULT current_user,
    reason         text NOT NULL DEFAULT '',
    at             timestamptz NOT NULL DEFAULT clock_timestamp(),
    expires_at     timestamptz
);
CREATE INDEX IF NOT EXISTS pause_event_latest ON atc.pause_event (assignment_id, id DESC);

-- Pointers to logs moved to S3. A step result whose log column is NULL and that has a row here
-- is read from S3; `summary` keeps what graders read (states, exit codes, points) without bodies.
CREATE TABLE IF NOT EXISTS atc.moved_log (
    step_result_id  integer PRIMARY KEY,
    bucket          text NOT NULL,
    key             text NOT NULL,
    size            bigint NOT NULL,
    sha256          text NOT NULL,
    summary         jsonb NOT NULL DEFAULT '{}',
    moved_at        timestamptz NOT NULL DEFAULT now(),
    moved_by        text NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS moved_log_key ON atc.moved_log (bucket, key);

-- Migration runs and per-shard progress, so an interrupted run resumes where it stopped and
-- several hosts can share one run.
CREATE TABLE IF NOT EXISTS atc.migration_run (
    id          bigserial PRIMARY KEY,
    started_at  timestamptz NOT NULL DEFAULT now(),
    operator    text NOT NULL,
    min_size    bigint NOT NULL,
    params      jsonb NOT NULL DEFAULT '{}',
    finished_at timestamptz
);
CREATE TABLE IF NOT EXISTS atc.migration_progress (
    run_id          bigint NOT NULL REFERENCES atc.migration_run(id) ON DELETE CASCADE,
    shard           integer NOT NULL,
    shard_count     integer NOT NULL,
    last_step_result_id integer NOT NULL DEFAULT 0,
    moved_logs      bigint NOT NULL DEFAULT 0,
    moved_bytes     bigint NOT NULL DEFAULT 0,
    skipped         bigint NOT NULL DEFAULT 0,
    failed          bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- Set when this shard's pass (and its retry sweeps) ended; NULL means resumable.
    finished_at     timestamptz,
    -- The last error that stopped or failed a log in this shard (one line), for the screen.
    last_error      text NOT NULL DEFAULT '',
    PRIMARY KEY (run_id, shard, shard_count)
);
-- Pointers listed in key order for the orphan scan's merge join with the S3 listing.
CREATE INDEX IF NOT EXISTS moved_log_key_c ON atc.moved_log (bucket, (key COLLATE "C"));

-- Cached per-assignment log bytes for the browse screens (summing pg_column_size over millions
-- of step results per page would be too slow); refreshed per page after it paints, shown with
-- its "as of". See console/browse.py.
CREATE TABLE IF NOT EXISTS atc.assignment_stats (
    assignment_id  integer PRIMARY KEY,
    step_results   bigint NOT NULL DEFAULT 0,
    log_bytes_db   bigint NOT NULL DEFAULT 0,
    log_bytes_s3   bigint NOT NULL DEFAULT 0,
    computed_at    timestamptz NOT NULL DEFAULT now()
);

INSERT INTO atc.schema_version (version) VALUES (1) ON CONFLICT DO NOTHING;

-- Reference AutoTest application schema: the subset of the CodeGrade backend (2020) layout that
-- atc touches, plus the broker's tables, which live in the same database. Used by `atc demo` and
-- the tests; documented in docs/schema.md. Table and column names follow the real application so
-- atc can be pointed at such a database unchanged. Idempotent.

CREATE TABLE IF NOT EXISTS "Course" (
    id          serial PRIMARY KEY,
    name        varchar NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS "User" (
    id          serial PRIMARY KEY,
    name        varchar NOT NULL,
    username    varchar NOT NULL UNIQUE
);

CREATE TABLE IF NOT EXISTS "AutoTest" (
    id                      serial PRIMARY KEY,
    setup_script            text NOT NULL DEFAULT '',
    run_setup_script        text NOT NULL DEFAULT '',
    finalize_script         text NOT NULL DEFAULT '',
    grade_calculation       varchar NOT NULL DEFAULT 'full',
    results_always_visible  boolean,
    prefer_teacher_revision boolean,
    created_at              timestamptz NOT NULL DEFAULT now()
);

DO $$ BEGIN
    CREATE TYPE assignmentstateenum AS ENUM ('hidden', 'open', 'done');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;

CREATE TABLE IF NOT EXISTS "Assignment" (
    id            serial PRIMARY KEY,
    name          varchar NOT NULL,
    state         assignmentstateenum NOT NULL DEFAULT 'hidden',
    deadline      timestamptz,
    "Course_id"   integer NOT NULL REFERENCES "Course"(id),
    auto_test_id  integer REFERENCES "AutoTest"(id),
    created_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ix_assignment_auto_test_id ON "Assignment" (auto_test_id);

CREATE TABLE IF NOT EXISTS "AutoTestSet" (
    id            serial PRIMARY KEY,
    auto_test_id  integer NOT NULL REFERENCES "AutoTest"(id) ON DELETE CASCADE,
    stop_points   double precision NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS "AutoTestSuite" (
    id                  serial PRIMARY KEY,
    auto_test_set_id    integer NOT NULL REFERENCES "AutoTestSet"(id) ON DELETE CASCADE,
    rubric_row_id       integer,
    network_disabled    boolean NOT NULL DEFAULT true,
    submission_info     boolean NOT NULL DEFAULT false,
    command_time_limit  double precision,
    created_at          timestamptz NOT NULL DEFAULT now()
);

DO $$ BEGIN
    CREATE TYPE autoteststeptesttype AS ENUM ('io_test', 'run_program', 'custom_output', 'check_points', 'junit_test');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;

CREATE TABLE IF NOT EXISTS "AutoTestStep" (
    id                  serial PRIMARY KEY,
    auto_test_suite_id  integer NOT NULL REFERENCES "AutoTestSuite"(id) ON DELETE CASCADE,
    "order"             integer NOT NULL,
    name                varchar NOT NULL,
    weight              double precision NOT NULL DEFAULT 1,
    hidden              boolean NOT NULL DEFAULT false,
    test_type           autoteststeptesttype NOT NULL,
    data                json NOT NULL DEFAULT '{}',
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ix_auto_test_step_suite ON "AutoTestStep" (auto_test_suite_id);

CREATE TABLE IF NOT EXISTS "AutoTestRun" (
    id                 serial PRIMARY KEY,
    auto_test_id       integer NOT NULL REFERENCES "AutoTest"(id) ON DELETE CASCADE,
    started_date       timestamptz,
    kill_date          timestamptz,
    job_id             uuid,
    job_number         integer NOT NULL DEFAULT 0,
    runners_requested  integer NOT NULL DEFAULT 0,
    batch_run_done     boolean NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ix_auto_test_run_auto_test_id ON "AutoTestRun" (auto_test_id, id);

CREATE TABLE IF NOT EXISTS "AutoTestRunner" (
    id              uuid PRIMARY KEY,
    ipaddr          varchar NOT NULL,
    last_heartbeat  timestamptz NOT NULL DEFAULT now(),
    job_id          uuid,
    run_id          integer REFERENCES "AutoTestRun"(id) ON DELETE SET NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS "Work" (
    id               serial PRIMARY KEY,
    "Assignment_id"  integer NOT NULL REFERENCES "Assignment"(id),
    "User_id"        integer NOT NULL REFERENCES "User"(id),
    created_at       timestamptz NOT NULL DEFAULT now(),
    deleted          boolean NOT NULL DEFAULT false
);
CREATE INDEX IF NOT EXISTS ix_work_assignment ON "Work" ("Assignment_id", id);

DO $$ BEGIN
    CREATE TYPE autoteststepresultstate AS ENUM ('not_started', 'running', 'passed', 'failed', 'timed_out', 'skipped');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;

CREATE TABLE IF NOT EXISTS "AutoTestResult" (
    id                   serial PRIMARY KEY,
    auto_test_run_id     integer NOT NULL REFERENCES "AutoTestRun"(id) ON DELETE CASCADE,
    auto_test_runner_id  uuid REFERENCES "AutoTestRunner"(id) ON DELETE SET NULL,
    work_id              integer NOT NULL REFERENCES "Work"(id) ON DELETE CASCADE,
    state                autoteststepresultstate NOT NULL DEFAULT 'not_started',
    started_at           timestamptz,
    setup_stdout         text,
    setup_stderr         text,
    final_result         boolean NOT NULL DEFAULT false,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ix_auto_test_result_run ON "AutoTestResult" (auto_test_run_id, id);
CREATE INDEX IF NOT EXISTS ix_auto_test_result_run_state ON "AutoTestResult" (auto_test_run_id, state);
CREATE INDEX IF NOT EXISTS ix_auto_test_result_work ON "AutoTestResult" (work_id);

CREATE TABLE IF NOT EXISTS auto_test_step_result (
    id                   serial PRIMARY KEY,
    auto_test_step_id    integer NOT NULL REFERENCES "AutoTestStep"(id) ON DELETE CASCADE,
    auto_test_result_id  integer NOT NULL REFERENCES "AutoTestResult"(id) ON DELETE CASCADE,
    state                autoteststepresultstate NOT NULL DEFAULT 'not_started',
    started_at           timestamptz,
    log                  json,
    attachment_filename  varchar,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ix_auto_test_step_result_result ON auto_test_step_result (auto_test_result_id, id);

-- The broker's tables (same database). The broker locks rows here; atc only reads them and, for
-- starvation recovery without the broker, updates them with SKIP LOCKED.
DO $$ BEGIN
    CREATE TYPE jobstate AS ENUM ('waiting_for_runner', 'started', 'finished');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;
DO $$ BEGIN
    CREATE TYPE runnerstate AS ENUM ('not_running', 'creating', 'started', 'assigned', 'running', 'cleaning', 'cleaned');
EXCEPTION WHEN duplicate_object THEN NULL; END $$;

CREATE TABLE IF NOT EXISTS job (
    id              serial PRIMARY KEY,
    state           jobstate NOT NULL DEFAULT 'waiting_for_runner',
    cg_url          varchar NOT NULL,
    remote_id       varchar NOT NULL,
    job_metadata    jsonb NOT NULL DEFAULT '{}',
    wanted_runners  integer NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (cg_url, remote_id)
);
CREATE INDEX IF NOT EXISTS ix_job_state ON job (state, created_at);

CREATE TABLE IF NOT EXISTS runner (
    id          uuid PRIMARY KEY,
    ipaddr      varchar NOT NULL,
    type        varchar NOT NULL DEFAULT 'simulated',
    state       runnerstate NOT NULL DEFAULT 'not_running',
    job_id      integer REFERENCES job(id) ON DELETE SET NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS ix_runner_state ON runner (state);

"""A small, fully deterministic AutoTest data set for browse tests and snapshots.

Fixed ids and timestamps (no now()), so SVG snapshots do not depend on when they run. Includes a
hostile assignment name, a moved (S3) log pointer, an empty log, and a pause event.
"""

from __future__ import annotations

import json

import psycopg

HOSTILE_NAME = "[bold]'; drop table x; --"
T0 = "2024-03-01 10:00:00+00"


def make_world(dsn: str, *, results_per_run: int = 3, steps_per_result: int = 3) -> dict:
    ids: dict = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        conn.execute("""INSERT INTO "Course" (id, name, created_at) VALUES (1, 'Programming 101', %s),
                        (2, 'Algorithms', %s)""", (T0, T0))
        users = [(i, f"Student {i:02d}", f"s{i:02d}") for i in range(1, 7)]
        conn.cursor().executemany('INSERT INTO "User" (id, name, username) VALUES (%s, %s, %s)', users)
        assignments = [
            (1, "Hello world", "open", "2024-03-10 23:59:00+00", 1),
            (2, "Linked lists", "done", "2024-02-10 23:59:00+00", 1),
            (3, HOSTILE_NAME, "open", None, 2),
            (4, "Sorting 100%_fast", "hidden", "2024-04-01 12:00:00+00", 2),
        ]
        step_types = ["run_program", "io_test", "check_points"]
        step_id = 0
        run_id = 0
        result_id = 0
        sr_id = 0
        work_id = 0
        for aid, name, state, deadline, course in assignments:
            conn.execute('INSERT INTO "AutoTest" (id, created_at) VALUES (%s, %s)', (aid, T0))
            conn.execute('INSERT INTO "AutoTestSet" (id, auto_test_id, created_at) VALUES (%s, %s, %s)', (aid, aid, T0))
            conn.execute('INSERT INTO "AutoTestSuite" (id, auto_test_set_id, created_at) VALUES (%s, %s, %s)', (aid, aid, T0))
            conn.execute('INSERT INTO "Assignment" (id, name, state, deadline, "Course_id", auto_test_id, created_at) '
                         'VALUES (%s, %s, %s, %s, %s, %s, %s)', (aid, name, state, deadline, course, aid, T0))
            steps = []
            for order in range(steps_per_result):
                step_id += 1
                steps.append(step_id)
                conn.execute('INSERT INTO "AutoTestStep" (id, auto_test_suite_id, "order", name, test_type, created_at) '
                             'VALUES (%s, %s, %s, %s, %s, %s)',
                             (step_id, aid, order, f"Step {order + 1} of {name[:12]}", step_types[order % 3], T0))
            if aid == 4:
                continue  # an assignment with no runs at all
            n_runs = 2 if aid == 1 else 1
            for r in range(n_runs):
                run_id += 1
                conn.execute('INSERT INTO "AutoTestRun" (id, auto_test_id, started_date, job_id, created_at) '
                             'VALUES (%s, %s, %s, %s, %s)',
                             (run_id, aid, f"2024-03-0{r + 2} 09:00:00+00", f"00000000-0000-0000-0000-{run_id:012d}", T0))
                for k in range(results_per_run):
                    work_id += 1
                    user = users[(k + aid) % len(users)][0]
                    conn.execute('INSERT INTO "Work" (id, "Assignment_id", "User_id", created_at) VALUES (%s, %s, %s, %s)',
                                 (work_id, aid, user, T0))
                    result_id += 1
                    rstate = ["passed", "failed", "running"][k % 3] if r == n_runs - 1 else "passed"
                    conn.execute('INSERT INTO "AutoTestResult" (id, auto_test_run_id, work_id, state, started_at, created_at, updated_at) '
                                 'VALUES (%s, %s, %s, %s, %s, %s, %s)',
                                 (result_id, run_id, work_id, rstate, "2024-03-02 09:01:00+00", T0, T0))
                    for j, sid in enumerate(steps):
                        sr_id += 1
                        sstate = "passed" if (rstate == "passed" or j == 0) else ("failed" if rstate == "failed" else "running")
                        log = json.dumps({"stdout": f"output of step {j} [red]x[/]\x1b[31mred\x1b[0m\n" * (j + 1),
                                          "stderr": "", "exit_code": 0 if sstate == "passed" else 1})
                        conn.execute('INSERT INTO auto_test_step_result (id, auto_test_step_id, auto_test_result_id, state, started_at, log, created_at, updated_at) '
                                     'VALUES (%s, %s, %s, %s, %s, %s, %s, %s)',
                                     (sr_id, sid, result_id, sstate, "2024-03-02 09:01:00+00", log, T0,
                                      f"2024-03-02 09:01:{j * 7 + 3:02d}+00"))
        # One moved log (pointer, body gone) and one step without any log.
        conn.execute("UPDATE auto_test_step_result SET log = NULL WHERE id IN (2, 3)")
        conn.execute("INSERT INTO atc.moved_log (step_result_id, bucket, key, size, sha256, moved_at) "
                     "VALUES (2, 'atc-test', 'atc/logs/2.json', 1048576, repeat('0', 64), %s)", (T0,))
        conn.execute("INSERT INTO atc.pause_event (assignment_id, paused, operator, reason, at) "
                     "VALUES (2, true, 'alice', 'INC-42 runaway logs', %s)", (T0,))
        for table in ('"Course"', '"User"', '"AutoTest"', '"AutoTestSet"', '"AutoTestSuite"', '"Assignment"',
                      '"AutoTestStep"', '"AutoTestRun"', '"Work"', '"AutoTestResult"', "auto_test_step_result"):
            conn.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
        ids.update(assignments=[a[0] for a in assignments], runs=run_id, results=result_id, step_results=sr_id)
    return ids

//! The real `dray` binary against both stores: the commands scripts use, and bad input.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

fn pg_url() -> String {
    std::env::var("DRAY_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database for one test: a SQLite file in a temp dir, or a fresh PostgreSQL schema.
enum Db {
    Sqlite(tempfile::TempDir),
    Pg(String),
}

impl Db {
    fn sqlite() -> Db {
        Db::Sqlite(tempfile::tempdir().unwrap())
    }

    fn pg() -> Db {
        Db::Pg(format!("dray_cli_{}", uuid::Uuid::now_v7().simple()))
    }

    fn url(&self) -> String {
        match self {
            Db::Sqlite(dir) => format!("sqlite://{}", dir.path().join("cli.db").display()),
            Db::Pg(_) => pg_url(),
        }
    }

    fn schema(&self) -> &str {
        match self {
            Db::Sqlite(_) => "dray",
            Db::Pg(s) => s,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_stdin(args, None)
    }

    fn run_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_dray"))
            .args(args)
            .env("DRAY_DATABASE_URL", self.url())
            .env("DRAY_SCHEMA", self.schema())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
        drop(input);
        child.wait_with_output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "dray {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).unwrap()
    }

    /// Runs a command that must fail with one line on stderr; returns that line.
    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "dray {args:?} should have failed");
        let err = String::from_utf8(out.stderr).unwrap();
        let line = err.trim_end();
        assert!(!line.is_empty(), "dray {args:?}: no error message");
        assert!(!line.contains("panicked"), "dray {args:?} panicked: {line}");
        line.to_owned()
    }

    fn stats(&self, queue: &str) -> Value {
        self.json(&["queue", "stats", queue])
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        if let Db::Pg(schema) = self {
            // Best effort: a test that fails still removes its schema.
            let _ = Command::new("psql")
                .args([
                    &pg_url(),
                    "-qc",
                    &format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"),
                ])
                .output();
        }
    }
}

fn empty_stats() -> Value {
    serde_json::json!({"available":0,"scheduled":0,"leased":0,"completed":0,"dead":0,"cancelled":0})
}

macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $name() { super::$name(super::Db::sqlite()) } )*
        }
        mod postgres {
            $( #[test] fn $name() { super::$name(super::Db::pg()) } )*
        }
    };
}

both_stores!(
    round_trip,
    delay_and_priority,
    nack_and_extend,
    bad_input_changes_nothing,
    unknown_and_unleased_ids_change_nothing,
    json_errors_are_machine_readable,
    jobs_list_show_cancel_retry,
    workflows_list_describe_signal_cancel_restart,
    crons_list_pause_trigger_history,
    outbox_stage_relay_stats_list,
);

fn outbox_stage_relay_stats_list(db: Db) {
    db.ok(&["migrate"]);
    let a = db.json(&[
        "outbox",
        "stage",
        "orders",
        "order.placed",
        "{\"n\":1}",
        "--event-id",
        "o-1",
    ]);
    assert_eq!(a["staged"], 1);
    db.ok(&[
        "outbox",
        "stage",
        "orders",
        "order.placed",
        "{\"n\":2}",
        "--ordering-key",
        "k",
    ]);
    assert!(
        db.ok(&[
            "outbox",
            "stage",
            "orders",
            "order.placed",
            "{}",
            "--event-id",
            "o-1"
        ])
        .contains("already")
    );
    assert_eq!(db.json(&["outbox", "stats", "orders"])["pending"], 2);
    let r = db.json(&[
        "outbox",
        "relay",
        "orders",
        "--to-queue",
        "order-events",
        "--once",
    ]);
    assert_eq!(
        (r["claimed"].as_u64(), r["published"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(db.stats("order-events")["available"], 2);
    let listed = db.json(&["outbox", "list", "orders", "--status", "published"]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert!(
        db.ok(&["outbox", "stats", "orders"])
            .contains("published 2")
    );
    assert!(
        db.ok(&["outbox", "requeue-failed", "orders"])
            .contains("requeued 0")
    );
    for (args, says) in [
        (vec!["outbox", "stats", "bad name"], "invalid outbox"),
        (
            vec!["outbox", "stage", "orders", "t", "{nope"],
            "not valid JSON",
        ),
        (
            vec!["outbox", "list", "orders", "--limit", "0"],
            "must be 1 to 10000",
        ),
        (
            vec!["outbox", "list", "orders", "--status", "lost"],
            "not pending",
        ),
        (
            vec![
                "outbox",
                "relay",
                "orders",
                "--to-queue",
                "bad queue",
                "--once",
            ],
            "invalid queue name",
        ),
    ] {
        let line = db.fails(&args);
        assert!(line.contains(says), "{args:?}: {line}");
    }
}

/// The demo leaves its per-second schedule in the database; `dray crons` reads and steers it.
fn crons_list_pause_trigger_history(db: Db) {
    assert!(db.ok(&["demo"]).contains("All demo checks passed."));
    let list = db.json(&["crons", "list"]);
    let tick = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["schedule"]["name"] == "demo_tick")
        .unwrap_or_else(|| panic!("{list}"))
        .clone();
    assert_eq!(tick["schedule"]["expression"], "* * * * * *");
    assert!(
        tick["next"].is_string(),
        "an active schedule has a next time: {tick}"
    );
    let text = db.ok(&["crons", "list"]);
    assert!(text.contains("demo_tick") && text.contains("UTC"), "{text}");
    let history = db.json(&["crons", "history", "demo_tick"]);
    let fired = history
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["status"] == "fired")
        .count();
    assert!(fired >= 3, "{history}");
    assert!(
        db.ok(&["crons", "pause", "demo_tick"])
            .contains("paused demo_tick")
    );
    let paused = db.json(&["crons", "list"]);
    let row = paused
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["schedule"]["name"] == "demo_tick")
        .unwrap()
        .clone();
    assert_eq!(row["schedule"]["paused"], true);
    assert!(row["next"].is_null());
    let job = db.json(&["crons", "trigger", "demo_tick"])["job"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(db.json(&["jobs", "show", &job])["kind"], "cron:demo_tick");
    let history = db.ok(&["crons", "history", "demo_tick", "--limit", "5"]);
    assert!(history.contains("triggered"), "{history}");
    assert!(db.ok(&["crons", "resume", "demo_tick"]).contains("resumed"));
    for (args, says) in [
        (vec!["crons", "pause", "nope"], "no schedule named"),
        (vec!["crons", "trigger", "nope"], "no schedule named"),
        (vec!["crons", "history", "nope"], "no schedule named"),
        (
            vec!["crons", "history", "demo_tick", "--limit", "0"],
            "must be 1 to 10000",
        ),
    ] {
        let line = db.fails(&args);
        assert!(line.contains(says), "{args:?}: {line}");
    }
}

/// The demo leaves two runs in the database (a verified signup, a compensated saga); the
/// `workflows` commands read and steer them, and refuse bad input with one line.
fn workflows_list_describe_signal_cancel_restart(db: Db) {
    let demo = db.ok(&["demo"]);
    assert!(demo.contains("All demo checks passed."), "{demo}");
    let runs = db.json(&["workflows", "list"]);
    let runs = runs.as_array().unwrap();
    assert_eq!(runs.len(), 2, "{runs:?}");
    let find = |name: &str| {
        runs.iter()
            .find(|r| r["run"]["name"] == name)
            .unwrap_or_else(|| panic!("no {name} run: {runs:?}"))
            .clone()
    };
    let verify = find("demo_verify_account");
    let trip = find("demo_book_trip");
    assert_eq!(verify["status"], "completed");
    assert_eq!(trip["status"], "compensated");
    let (vid, tid) = (
        verify["run"]["id"].as_str().unwrap().to_owned(),
        trip["run"]["id"].as_str().unwrap().to_owned(),
    );
    let only = db.json(&["workflows", "list", "--name", "demo_book_trip"]);
    assert_eq!(only.as_array().unwrap().len(), 1);
    let compensated = db.json(&["workflows", "list", "--status", "compensated"]);
    assert_eq!(compensated[0]["run"]["id"], tid.as_str());

    let d = db.json(&["workflows", "describe", &tid]);
    assert_eq!(d["steps"].as_array().unwrap().len(), 3);
    assert_eq!(d["run"]["end_reason"], "failed");
    // By workflow name and id, in text: the step timeline.
    let by_name = format!(
        "demo_verify_account/{}",
        verify["run"]["workflow_id"].as_str().unwrap()
    );
    let text = db.ok(&["workflows", "describe", &by_name]);
    assert!(
        text.contains("make_token") && text.contains("clicked"),
        "{text}"
    );
    assert_eq!(db.json(&["workflows", "result", &vid])["output"], true);
    let line = db.fails(&["workflows", "result", &tid]);
    assert!(
        line.contains("ended compensated") && line.contains("card declined"),
        "{line}"
    );
    let line = db.fails(&["workflows", "signal", &vid, "clicked", "\"again\""]);
    assert!(line.contains("has ended"), "{line}");

    // Restart the saga from its hotel: the flight's record is reused, the rest is to run.
    let restarted = db.json(&["workflows", "restart", &tid, "--from", "hotel"]);
    let new = restarted["run"].as_str().unwrap().to_owned();
    let d = db.json(&["workflows", "describe", &new]);
    assert_eq!(d["run"]["restarted_from"], tid.as_str());
    assert_eq!(d["steps"].as_array().unwrap().len(), 1, "{d}");
    assert_eq!(d["steps"][0]["name"], "flight");
    assert_eq!(
        db.json(&["workflows", "describe", &tid])["run"]["superseded_by"],
        new.as_str()
    );
    assert!(
        db.ok(&["workflows", "result", &new])
            .contains("has not ended yet")
    );
    assert!(
        db.ok(&["workflows", "signal", &new, "nudge"])
            .contains("sent signal")
    );
    assert!(
        db.ok(&["workflows", "cancel", &new])
            .contains("cancel requested")
    );

    // Bad input: one line each, nothing changed.
    let unknown = uuid::Uuid::now_v7().to_string();
    for (args, says) in [
        (vec!["workflows", "describe", "nope"], "names no run"),
        (vec!["workflows", "describe", &unknown], "no workflow run"),
        (
            vec!["workflows", "signal", &unknown, "x"],
            "no workflow run",
        ),
        (
            vec!["workflows", "signal", &new, "x", "{not json"],
            "not valid JSON",
        ),
        (vec!["workflows", "list", "--status", "bogus"], "not one of"),
        (
            vec!["workflows", "list", "--limit", "0"],
            "must be 1 to 10000",
        ),
        (
            vec!["workflows", "restart", &vid, "--from", "nope"],
            "has no step",
        ),
        (
            vec!["workflows", "describe", "demo_verify_account/missing"],
            "no workflow run",
        ),
    ] {
        let line = db.fails(&args);
        assert!(line.contains(says), "{args:?}: {line}");
    }
    let err = db.run(&["--json", "workflows", "describe", "nope"]);
    let v: Value = serde_json::from_slice(&err.stdout).unwrap();
    assert_eq!(v["error"]["code"], "invalid_run");
}

fn jobs_list_show_cancel_retry(db: Db) {
    db.ok(&["migrate"]);
    let a = db.json(&["queue", "enqueue", "work", "{\"n\":1}", "--type", "export"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = db.json(&[
        "queue", "enqueue", "work", "2", "--type", "email", "--delay", "1h",
    ])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let all = db.json(&["jobs", "list"]);
    assert_eq!(all.as_array().unwrap().len(), 2);
    assert_eq!(all[0]["id"], b.as_str(), "newest first");
    let exports = db.json(&["jobs", "list", "--kind", "export", "--state", "available"]);
    assert_eq!(exports.as_array().unwrap().len(), 1);
    assert_eq!(exports[0]["id"], a.as_str());
    assert!(
        db.ok(&["jobs", "list", "--queue", "work"])
            .contains("export")
    );

    assert!(db.ok(&["jobs", "cancel", &b]).contains("will not run"));
    assert_eq!(db.json(&["jobs", "show", &b])["state"], "cancelled");
    assert!(db.ok(&["jobs", "cancel", &b]).contains("already finished"));
    let redriven = db.json(&["jobs", "retry", &b]);
    assert_eq!(redriven["state"], "available");
    assert_eq!(redriven["attempt"], 0);

    let line = db.fails(&["jobs", "retry", &a]);
    assert!(line.contains("only a dead or cancelled job"), "{line}");
    let unknown = uuid::Uuid::now_v7().to_string();
    assert!(
        db.fails(&["jobs", "cancel", &unknown])
            .contains("no message or job")
    );
    assert!(
        db.fails(&["jobs", "show", "nope"])
            .contains("not a message id")
    );
    assert!(
        db.fails(&["jobs", "list", "--state", "sleeping"])
            .contains("not one of")
    );
    assert!(
        db.fails(&["jobs", "list", "--queue", "bad name"])
            .contains("invalid queue name")
    );
}

fn round_trip(db: Db) {
    db.ok(&["migrate"]);
    assert!(
        db.ok(&["migrate"]).contains("up to date"),
        "migrate twice changes nothing"
    );

    let e = db.json(&[
        "queue",
        "enqueue",
        "emails",
        r#"{"to":"a@b.c"}"#,
        "--type",
        "welcome",
        "--header",
        "trace=t1",
    ]);
    let id = e["id"].as_str().unwrap().to_owned();
    assert_eq!(e["duplicate"], false);
    let many = db.json(&["queue", "enqueue-many", "emails", "1", "2", r#""three""#]);
    assert_eq!(many.as_array().unwrap().len(), 3);
    let stdin = db.run_stdin(
        &["--json", "queue", "enqueue-many", "emails"],
        Some("{\"n\":4}\n\n{\"n\":5}\n"),
    );
    assert!(
        stdin.status.success(),
        "{}",
        String::from_utf8_lossy(&stdin.stderr)
    );
    let arr = db.run_stdin(&["queue", "enqueue-many", "emails"], Some("[6, 7]"));
    assert!(arr.status.success());
    assert_eq!(db.stats("emails")["available"], 8);

    let got = db.json(&[
        "queue",
        "receive",
        "emails",
        "--limit",
        "10",
        "--timeout",
        "1s",
    ]);
    let got = got.as_array().unwrap();
    assert_eq!(got.len(), 8);
    assert_eq!(got[0]["id"], id.as_str());
    assert_eq!(got[0]["kind"], "welcome");
    assert_eq!(got[0]["headers"]["trace"], "t1");
    assert_eq!(got[0]["state"], "running");
    let ids: Vec<&str> = got.iter().map(|m| m["id"].as_str().unwrap()).collect();
    let mut args = vec!["queue", "ack", "emails"];
    args.extend(&ids);
    assert_eq!(db.ok(&args).trim(), "acked 8");
    assert_eq!(db.stats("emails")["completed"], 8);
    let shown = db.json(&["queue", "show", &id]);
    assert_eq!(shown["state"], "completed");
    assert!(
        db.ok(&["queue", "stats", "emails"])
            .contains("completed  8")
    );
    assert!(
        db.ok(&["queue", "receive", "emails"])
            .contains("no messages")
    );
}

fn delay_and_priority(db: Db) {
    db.ok(&["migrate"]);
    db.ok(&["queue", "enqueue", "q", "\"later\"", "--delay", "1h"]);
    db.ok(&["queue", "enqueue", "q", "\"low\"", "--priority", "low"]);
    db.ok(&[
        "queue",
        "enqueue",
        "q",
        "\"crit\"",
        "--priority",
        "critical",
    ]);
    db.ok(&[
        "queue",
        "enqueue",
        "q",
        "\"future\"",
        "--not-before",
        "2999-01-01T00:00:00Z",
    ]);
    let s = db.stats("q");
    assert_eq!(
        (s["available"].as_i64(), s["scheduled"].as_i64()),
        (Some(2), Some(2))
    );
    let got = db.json(&["queue", "receive", "q", "--limit", "5"]);
    let payloads: Vec<&str> = got
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["payload"].as_str().unwrap())
        .collect();
    assert_eq!(payloads, ["crit", "low"]);
    let k1 = db.json(&["queue", "enqueue", "q", "1", "--key", "k"]);
    let k2 = db.json(&["queue", "enqueue", "q", "2", "--key", "k"]);
    assert_eq!(k1["id"], k2["id"]);
    assert_eq!(k2["duplicate"], true);
    assert!(
        db.ok(&["queue", "enqueue", "q", "3", "--key", "k"])
            .contains("duplicate key")
    );
}

fn nack_and_extend(db: Db) {
    db.ok(&["migrate"]);
    let a = db.json(&["queue", "enqueue", "n", "1"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    db.json(&["queue", "receive", "n", "--lease", "1s"]);
    let ext = db.json(&["queue", "extend", "n", &a, "--by", "10m"]);
    assert_eq!(ext["count"], 1);
    let shown = db.json(&["queue", "show", &a]);
    assert!(shown["leased_until"].is_string());
    assert_eq!(db.ok(&["queue", "nack", "n", &a]).trim(), "requeued 1");
    let again = db.json(&["queue", "receive", "n"]);
    assert_eq!(again[0]["attempt"], 2);
    // A release gives the delivery back uncounted: the next one is attempt 2 again.
    assert_eq!(
        db.ok(&["queue", "nack", "n", &a, "--release"]).trim(),
        "released 1"
    );
    let again = db.json(&["queue", "receive", "n"]);
    assert_eq!(again[0]["attempt"], 2);
    assert!(
        db.fails(&["queue", "nack", "n", &a, "--release", "--dead"])
            .contains("cannot be used with")
    );
    assert_eq!(
        db.json(&["queue", "nack", "n", &a, "--dead"])["action"],
        "dead"
    );
    assert_eq!(db.stats("n")["dead"], 1);
}

fn bad_input_changes_nothing(db: Db) {
    // On SQLite, nothing is even created: arguments are checked before the file is opened.
    let bad: &[(&[&str], &str)] = &[
        (
            &["queue", "enqueue", "emails", "{not json"],
            "not valid JSON",
        ),
        (&["queue", "enqueue", "", "1"], "invalid queue name"),
        (&["queue", "enqueue", "bad name", "1"], "invalid queue name"),
        (
            &["queue", "enqueue", &"x".repeat(200), "1"],
            "invalid queue name",
        ),
        (
            &["queue", "enqueue", "emails", "1", "--delay", "5 parsecs"],
            "write it like",
        ),
        (
            &["queue", "enqueue", "emails", "1", "--priority", "urgent"],
            "priority",
        ),
        (
            &[
                "queue",
                "enqueue",
                "emails",
                "1",
                "--not-before",
                "tomorrow",
            ],
            "RFC 3339",
        ),
        (
            &[
                "queue",
                "enqueue",
                "emails",
                "1",
                "--delay",
                "1s",
                "--not-before",
                "2030-01-01T00:00:00Z",
            ],
            "cannot be used with",
        ),
        (
            &["queue", "enqueue-many", "emails", "1", "[oops"],
            "payload 2",
        ),
        (
            &["queue", "ack", "emails", "not-a-uuid"],
            "not a message id",
        ),
        (&["queue", "receive", "emails", "--limit", "0"], "limit"),
        (&["queue", "stats", "no/slash"], "invalid queue name"),
    ];
    for (args, says) in bad {
        let line = db.fails(args);
        assert!(
            line.contains(says),
            "dray {args:?}: expected {says:?} in {line:?}"
        );
    }
    if let Db::Sqlite(dir) = &db {
        assert!(
            !dir.path().join("cli.db").exists(),
            "bad input created the database file"
        );
    }
    if let Db::Pg(_) = &db {
        // Not migrated yet: the error says what to do.
        let line = db.fails(&["queue", "stats", "emails"]);
        assert!(line.contains("dray migrate"), "{line}");
    }
    db.ok(&["migrate"]);
    let line = db.fails(&["queue", "enqueue", "emails", "{not json"]);
    assert!(line.contains("not valid JSON"));
    assert_eq!(db.stats("emails"), empty_stats());
}

fn unknown_and_unleased_ids_change_nothing(db: Db) {
    db.ok(&["migrate"]);
    let a = db.json(&["queue", "enqueue", "u", "1"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let b = db.json(&["queue", "enqueue", "u", "2"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    db.json(&["queue", "receive", "u"]); // leases a only
    let unknown = uuid::Uuid::now_v7().to_string();
    let line = db.fails(&["queue", "ack", "u", &a, &unknown]);
    assert!(line.contains("no message or job with id"), "{line}");
    let line = db.fails(&["queue", "ack", "u", &a, &b]);
    assert!(
        line.contains("nothing changed") && line.contains("available"),
        "{line}"
    );
    let line = db.fails(&["queue", "nack", "other", &a]);
    assert!(line.contains("is on queue"), "{line}");
    let line = db.fails(&["queue", "show", &unknown]);
    assert!(line.contains("no message or job"), "{line}");
    let s = db.stats("u");
    assert_eq!(
        (
            s["leased"].as_i64(),
            s["available"].as_i64(),
            s["completed"].as_i64()
        ),
        (Some(1), Some(1), Some(0))
    );
}

fn json_errors_are_machine_readable(db: Db) {
    let out = db.run(&["--json", "queue", "enqueue", "bad name", "1"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "invalid_queue_name");
    assert!(v["error"]["message"].as_str().unwrap().contains("A-Z"));
    // Argument errors too: with --json anywhere, the same shape on stdout and exit 1, each
    // with a stable code.
    for (args, code, says) in [
        (
            &["--json", "queue", "enqueue", "q", "1", "--delay", "soon"][..],
            "invalid_argument",
            "--delay",
        ),
        (
            &["jobs", "list", "--state", "paused", "--json"],
            "invalid_argument",
            "paused",
        ),
        (
            &["--json", "queue", "frobnicate"],
            "unknown_command",
            "frobnicate",
        ),
        (
            &["--json", "queue", "stats", "q", "--colour"],
            "unknown_argument",
            "--colour",
        ),
        (&["--json", "queue", "enqueue"], "missing_argument", "QUEUE"),
    ] {
        let out = db.run(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("{args:?}: {e}: {:?}", String::from_utf8_lossy(&out.stdout))
        });
        assert_eq!(v["error"]["code"], code, "{args:?}: {v}");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{args:?}: {message}");
        assert!(!message.starts_with("error:"), "{message}");
    }
    // Without --json, clap's own text and exit 2.
    let out = db.run(&["queue", "frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
}

#[test]
fn bad_urls_and_unreachable_databases() {
    let run = |url: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_dray"))
            .args(["--database", url, "queue", "stats", "q"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{url}");
        String::from_utf8(out.stderr).unwrap()
    };
    assert!(run("mysql://x/y").contains("expected postgres://"));
    assert!(
        run("postgres://postgres@127.0.0.1:1/none").contains("check that the server is running")
    );
    assert!(run("sqlite:///nonexistent-dir/x/y.db").contains("there is no database file"));
}

/// Only `migrate` creates a SQLite file: any other command on a path with no file is refused
/// naming it, and creates nothing.
#[test]
fn a_missing_sqlite_file_is_named_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.db");
    let url = format!("sqlite://{}", path.display());
    for args in [
        &["queue", "stats", "q"][..],
        &["jobs", "list"],
        &["queue", "enqueue", "q", "1"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_dray"))
            .args(["--database", &url])
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert!(
            err.contains("typo.db") && err.contains("dray migrate"),
            "{err}"
        );
        assert!(!path.exists(), "{args:?} created the file");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dray"))
        .args(["--database", &url, "migrate"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(path.exists());
}

#[test]
fn demo_runs_on_sqlite_with_no_setup() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dray"))
        .arg("demo")
        .current_dir(dir.path())
        .env_remove("DRAY_DATABASE_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("All demo checks passed."));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the demo leaves no file behind"
    );
}

#[test]
fn bench_prints_json_lines_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_dray"))
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    let db = format!("sqlite://{}", dir.path().join("b.db").display());
    let bench = |workloads: &str, n: &str| bench_json(&db, &["--workload", workloads, "--n", n]);
    let lines = bench("W1-batch,plain-insert,W1-single", "200");
    assert_eq!(lines[0]["system"], "meta", "versions and machine first");
    assert!(lines[0]["database"].as_str().unwrap().starts_with("SQLite"));
    let batch = lines.iter().find(|l| l["workload"] == "W1-batch").unwrap();
    assert_eq!(
        (
            batch["system"].as_str(),
            batch["store"].as_str(),
            batch["n"].as_u64()
        ),
        (Some("dray"), Some("sqlite"), Some(200))
    );
    assert!(batch["value"].as_f64().unwrap() > 0.0);
    assert_eq!(batch["unit"], "jobs/s");
    assert!(
        lines
            .iter()
            .any(|l| l["system"] == "ratio" && l["what"] == "sqlite W1-single / plain-insert")
    );

    // W3 and its baseline: the same paced INSERT of a plain row, its p50 beside W3's (both
    // 1,000 calls whatever `--n` says).
    let lines = bench("paced-insert,W3", "200");
    let paced = lines
        .iter()
        .find(|l| l["workload"] == "paced-insert")
        .unwrap();
    assert_eq!(
        (
            paced["system"].as_str(),
            paced["unit"].as_str(),
            paced["n"].as_u64()
        ),
        (Some("raw-sql"), Some("ms"), Some(1000))
    );
    let p50 = paced["value"].as_f64().unwrap();
    let p99 = paced["extra"]["p99_ms"].as_f64().unwrap();
    assert!(p50 > 0.0 && p99 >= p50, "p50 {p50} ms, p99 {p99} ms");
    let w3 = lines.iter().find(|l| l["workload"] == "W3").unwrap();
    assert_eq!(w3["extra"]["samples"], 1000, "every job picked up");
    assert!(w3["extra"]["enqueue_p50_ms"].as_f64().unwrap() > 0.0);
    let ratio = lines
        .iter()
        .find(|l| l["system"] == "ratio" && l["what"] == "sqlite W3 / paced-insert")
        .unwrap();
    let expected = w3["value"].as_f64().unwrap() / p50;
    assert!((ratio["value"].as_f64().unwrap() - expected).abs() < 1e-9);

    let out = run(&["bench", "--workload", "W9"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown workload \"W9\""));
    let out = run(&["bench", "--reps", "0"]);
    assert_eq!(out.status.code(), Some(1));
}

/// `dray --database <url> --json bench --reps 1 <args>`, which must succeed; its JSON lines.
fn bench_json(url: &str, args: &[&str]) -> Vec<Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_dray"))
        .args(["--database", url, "--json", "bench", "--reps", "1"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every workload of the harness on PostgreSQL, as `compare.sh` runs them (small `n`): each
/// one's line with a real figure, W2's drain checked complete with its peak RSS and WAL bytes,
/// W3, W3-remote and W3-scheduled with every job picked up, W6's three phases (one second
/// each, two for the held transaction), the ratios, W4's 2,000 workflow runs and W5's 20,000
/// outbox events.
#[test]
fn bench_runs_every_workload_on_postgres() {
    let lines = bench_json(&pg_url(), &["--n", "300", "--phase-secs", "1"]);
    assert_eq!(lines[0]["system"], "meta");
    assert!(
        lines[0]["database"]
            .as_str()
            .unwrap()
            .starts_with("PostgreSQL"),
        "{}",
        lines[0]
    );
    let line = |workload: &str| -> &Value {
        let found: Vec<&Value> = lines.iter().filter(|l| l["workload"] == workload).collect();
        assert_eq!(found.len(), 1, "one line for {workload}: {lines:?}");
        assert_eq!(found[0]["store"], "postgres");
        found[0]
    };
    for (w, system, unit, n) in [
        ("plain-insert", "raw-sql", "rows/s", 300),
        ("W1-single", "dray", "jobs/s", 300),
        ("W1-batch", "dray", "jobs/s", 300),
        ("floor", "raw-sql", "jobs/s", 300),
        ("W2", "dray", "jobs/s", 300),
        ("W2-tuned", "dray", "jobs/s", 300),
        ("paced-insert", "raw-sql", "ms", 1000),
        ("W3", "dray", "ms", 1000),
        ("W3-remote", "dray", "ms", 1000),
        ("W3-scheduled", "dray", "ms", 200),
        ("W6", "dray", "ms", 3200),
    ] {
        let l = line(w);
        assert_eq!(
            (l["system"].as_str(), l["unit"].as_str(), l["n"].as_u64()),
            (Some(system), Some(unit), Some(n)),
            "{l}"
        );
        let (value, min, max) = (
            l["value"].as_f64().unwrap(),
            l["min"].as_f64().unwrap(),
            l["max"].as_f64().unwrap(),
        );
        assert!(value > 0.0 && min <= value && value <= max, "{l}");
        assert_eq!(l["reps"], 1, "{l}");
    }
    for w in ["W2", "W2-tuned"] {
        let extra = &line(w)["extra"];
        let rss = extra["peak_rss_mib"].as_f64().unwrap();
        assert!(rss > 0.0 && rss < 100.0, "{w}: peak RSS {rss} MiB");
        assert!(extra["wal_bytes_per_job"].as_f64().unwrap() > 0.0, "{w}");
    }
    assert_eq!(line("W2-tuned")["extra"]["concurrency"], 1000);
    for (w, n) in [("W3", 1000), ("W3-remote", 1000), ("W3-scheduled", 200)] {
        let extra = &line(w)["extra"];
        assert_eq!(extra["samples"], n, "{w}: every job picked up");
        let (p50, p99) = (
            line(w)["value"].as_f64().unwrap(),
            extra["p99_ms"].as_f64().unwrap(),
        );
        assert!(p99 >= p50, "{w}: p50 {p50} ms, p99 {p99} ms");
    }
    // W6: every phase has its samples and percentiles, and the tables were measured after each.
    let w6 = &line("W6")["extra"];
    for phase in ["clean", "held", "recovery"] {
        let p = &w6["phases"][phase];
        assert!(p["samples"].as_u64().unwrap() > 10, "{phase}: {w6}");
        assert!(
            p["p99_ms"].as_f64().unwrap() >= p["p50_ms"].as_f64().unwrap(),
            "{phase}: {w6}"
        );
        assert!(
            w6["tables"][phase]["hot_bytes"].as_i64().unwrap() > 0,
            "{w6}"
        );
    }
    assert!(
        line("W2")["extra"]["tables_after"]["hot_bytes"]
            .as_i64()
            .unwrap()
            > 0
    );
    // W4: 2,000 runs of three steps, every one completed (the harness checks it).
    let w4 = line("W4");
    assert_eq!(
        (w4["unit"].as_str(), w4["n"].as_u64(), w4["reps"].as_u64()),
        (Some("runs/s"), Some(2000), Some(1)),
        "{w4}"
    );
    assert!(w4["value"].as_f64().unwrap() > 0.0, "{w4}");
    assert!(
        w4["extra"]["wal_bytes_per_run"].as_f64().unwrap() > 0.0,
        "{w4}"
    );
    for what in [
        "postgres W1-single / plain-insert",
        "postgres W2 / floor",
        "postgres W2-tuned / floor",
        "postgres W3 / paced-insert",
    ] {
        let r = lines
            .iter()
            .find(|l| l["system"] == "ratio" && l["what"] == what)
            .unwrap_or_else(|| panic!("no ratio {what}: {lines:?}"));
        assert!(r["value"].as_f64().unwrap() > 0.0, "{r}");
    }
}

/// `--log-format json` with RUST_LOG: one JSON object per line, one line per job outcome
/// (completed at info, with the job's span: id, kind, queue; failures at warn, with the error).
#[test]
fn job_outcomes_are_structured_log_lines() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_dray"))
        .args(["--log-format", "json", "demo"])
        .current_dir(dir.path())
        .env_remove("DRAY_DATABASE_URL")
        .env_remove("DRAY_LOG")
        .env("RUST_LOG", "dray::jobs=info")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stderr)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let completed: Vec<&Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "dray: job completed")
        .collect();
    assert!(!completed.is_empty(), "{lines:?}");
    let c = completed
        .iter()
        .find(|l| l["span"]["kind"] == "export_users")
        .unwrap_or_else(|| panic!("{completed:?}"));
    assert_eq!(c["level"], "INFO");
    assert_eq!(c["fields"]["outcome"], "completed");
    assert!(c["fields"]["duration_ms"].is_u64());
    assert!(
        c["span"]["id"].is_string() && c["span"]["queue"].is_string(),
        "{c}"
    );
    let failed = lines
        .iter()
        .find(|l| l["fields"]["message"] == "dray: job attempt failed")
        .unwrap_or_else(|| panic!("{lines:?}"));
    assert_eq!(failed["level"], "WARN");
    assert!(failed["fields"]["error"].is_string(), "{failed}");
    assert!(
        ["retry", "dead", "cancelled"].contains(&failed["fields"]["outcome"].as_str().unwrap()),
        "{failed}"
    );
}

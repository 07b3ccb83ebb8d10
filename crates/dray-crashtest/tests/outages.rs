//! The chaos suite, part two: what goes wrong around the workers rather than in them. A
//! PostgreSQL server restarted under load (a private cluster, so the shared server is left
//! alone), a pool whose every connection handlers hold, a LISTEN connection gone half-open
//! behind a TCP proxy, worker processes whose wall clocks are hours off (libfaketime), and a
//! database that refuses writes (a read-only role) or is full (SQLite on a tiny tmpfs). Each
//! ends by checking that no job was lost and that work resumed by itself.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    DRAIN, Effect, Fine, drained, enqueue, no_job_lost, pg_done_per_job, pg_store, pg_store_at,
    pg_url, spawn, spawn_env, suffix, wait_for,
};
use dray::{Client, Job, JobContext, JobError, MessageState, PgStore, SqliteStore, Worker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs `cmd`, as the `postgres` user when this process is root (PostgreSQL refuses to run as
/// root), and fails the test with its output if it fails.
fn run_as_postgres(program: &Path, args: &[&str]) {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    let mut cmd = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    let out = cmd.args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A PostgreSQL cluster of this test's own (initdb in a temporary directory, its own port),
/// so that stopping it disturbs no other test. Stopped when dropped.
struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl Cluster {
    fn start() -> Cluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's server binaries are required (/usr/lib/postgresql/*/bin)")
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("no initdb under /usr/lib/postgresql");
        let dir = tempfile::tempdir().unwrap();
        let _ = Command::new("chown")
            .args(["postgres:postgres", dir.path().to_str().unwrap()])
            .status();
        let data = dir.path().join("data");
        run_as_postgres(
            &bin.join("initdb"),
            &[
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "--no-instructions",
            ],
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = Cluster { dir, bin, port };
        cluster.up();
        cluster
    }

    fn pg_ctl(&self, args: &[&str]) {
        let data = self.dir.path().join("data");
        let mut all = vec!["-D", data.to_str().unwrap()];
        all.extend_from_slice(args);
        run_as_postgres(&self.bin.join("pg_ctl"), &all);
    }

    fn up(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log");
        self.pg_ctl(&[
            "-o",
            &options,
            "-l",
            log.to_str().unwrap(),
            "-w",
            "-t",
            "60",
            "start",
        ]);
    }

    /// A fast shutdown: every session is ended, open transactions roll back.
    fn down(&self) {
        self.pg_ctl(&["-m", "fast", "-w", "-t", "60", "stop"]);
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}

/// Enqueues a batch of 10, retrying while the server is away (a batch whose commit happened
/// but whose reply was lost is enqueued twice: the end count comes from the database).
async fn enqueue_retrying(client: &Client<PgStore>, from: i64, errors: &mut u32) {
    let chunk: Vec<i64> = (from..from + 10).collect();
    while client.enqueue_many::<Effect>(chunk.iter()).await.is_err() {
        *errors += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Scenario 3: the PostgreSQL server is stopped (fast shutdown) and started again while two
/// worker processes run a steady 100 jobs/s. They reconnect (pool and LISTEN) by themselves;
/// the time from the server's return to the first job finished after it is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_load() {
    let cluster = Cluster::start();
    let url = cluster.url();
    let (store, schema) = pg_store_at(&url, "dray_restart").await;
    let client = Client::new(store.clone());
    let workers: Vec<_> = (0..2).map(|_| spawn(&url, &schema, "work")).collect();
    let producer = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut errors = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            for i in 0..120 {
                tick.tick().await;
                enqueue_retrying(&client, i * 10, &mut errors).await;
            }
            errors
        })
    };
    wait_for("load to build up", DRAIN, async || {
        common::pg_effects(&store, "done").await >= 300
    })
    .await;
    cluster.down();
    let down = Instant::now();
    // The outage itself: a second with no server.
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.up();
    let up = Instant::now();
    // Recovery: a job enqueued now is run by a worker that was running before the restart.
    let mut errors = 0;
    let marker = loop {
        match client.enqueue::<Effect>(&-1).await {
            Ok(e) => break e.id,
            Err(_) => {
                errors += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let outcome = client.wait(marker, DRAIN).await.unwrap();
    assert_eq!(outcome.state, MessageState::Completed);
    let recovered = up.elapsed();
    // Both workers listen again.
    let listening = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dray:{schema}:listen'"
    );
    wait_for("both workers to LISTEN again", DRAIN, async || {
        dray::sqlx::query_scalar::<_, i64>(dray::sqlx::AssertSqlSafe(listening.clone()))
            .fetch_one(store.pool())
            .await
            .is_ok_and(|n| n >= 2)
    })
    .await;
    errors += producer.await.unwrap();
    let stats = client.queue().stats("default").await.unwrap();
    let n = stats.completed + stats.dead + stats.available + stats.scheduled + stats.leased;
    assert!(n > 1200, "every batch was enqueued: {n}");
    drained(&client, n, "the drain after the restart").await;
    let twice = no_job_lost(&client, n, pg_done_per_job(&store).await).await;
    eprintln!(
        "PostgreSQL restarted under load ({n} jobs): down for {:?}; the first job enqueued \
         after it came back finished {recovered:?} later; the producer retried {errors} \
         times; {twice} effects happened twice",
        up - down
    );
    drop(workers);
    store.close().await;
}

/// Holds one connection of its store's pool until the test lets go.
struct HoldsConnection {
    held: Arc<AtomicUsize>,
    release: tokio::sync::watch::Receiver<bool>,
}

impl Job for HoldsConnection {
    const NAME: &'static str = "holds_connection";
    type Input = ();
    type Output = ();
    async fn run(&self, ctx: &JobContext, _: ()) -> Result<(), JobError> {
        let store = ctx.store::<PgStore>().expect("a PostgreSQL store");
        let mut conn = store.pool().acquire().await?;
        self.held.fetch_add(1, Ordering::SeqCst);
        let mut release = self.release.clone();
        release.wait_for(|r| *r).await.ok();
        dray::sqlx::query("SELECT 1").execute(&mut *conn).await?;
        Ok(())
    }
}

/// Scenario 5: handlers hold every connection of the store's pool for several leases. The
/// worker's own transitions (claims, heartbeats, completions) run on connections of their
/// own, so other jobs still flow and the holders keep their leases (they finish on attempt
/// 1); an enqueue through the exhausted pool fails after the acquire timeout with
/// `pool_exhausted`, and works again once the handlers let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_holding_every_pooled_connection() {
    let (admin, schema) = pg_store("dray_chaos").await;
    let admin_client = Client::new(admin.clone());
    let store = PgStore::builder(pg_url())
        .schema(schema.as_str())
        .max_connections(2)
        .acquire_timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let held = Arc::new(AtomicUsize::new(0));
    let (let_go, release) = tokio::sync::watch::channel(false);
    let worker = Worker::new(store.clone())
        .register(HoldsConnection {
            held: held.clone(),
            release,
        })
        .register(Fine)
        .configure(|c| {
            c.lease = Duration::from_millis(600);
            c.heartbeat = Duration::from_millis(150);
        })
        .start()
        .unwrap();
    let holders = [
        admin_client
            .enqueue::<HoldsConnection>(&())
            .await
            .unwrap()
            .id,
        admin_client
            .enqueue::<HoldsConnection>(&())
            .await
            .unwrap()
            .id,
    ];
    wait_for("both connections to be held", DRAIN, async || {
        held.load(Ordering::SeqCst) == 2
    })
    .await;
    let holding_since = Instant::now();
    let refused = Client::new(store.clone()).enqueue::<Fine>(&0).await;
    let err = refused.expect_err("the pool has no free connection");
    assert_eq!(err.code(), "pool_exhausted", "{err}");
    assert!(err.to_string().contains("acquire_timeout"), "{err}");
    // Other jobs flow meanwhile.
    let inputs: Vec<i64> = (0..200).collect();
    for e in admin_client
        .enqueue_many::<Fine>(inputs.iter())
        .await
        .unwrap()
    {
        let out = admin_client.wait(e.id, DRAIN).await.unwrap();
        assert_eq!((out.state, out.attempts), (MessageState::Completed, 1));
    }
    // Hold on for at least four leases' worth, so a lease kept only by luck would have ended.
    tokio::time::sleep(Duration::from_millis(2400).saturating_sub(holding_since.elapsed())).await;
    let_go.send(true).unwrap();
    for id in holders {
        let out = admin_client.wait(id, DRAIN).await.unwrap();
        assert_eq!(
            (out.state, out.attempts),
            (MessageState::Completed, 1),
            "the holder kept its lease: {:?}",
            out.errors
        );
    }
    Client::new(store.clone())
        .enqueue::<Fine>(&1)
        .await
        .expect("the pool serves again");
    eprintln!(
        "two handlers held both pooled connections for {:?}: 200 other jobs ran meanwhile, an \
         enqueue through that pool failed with pool_exhausted, both holders finished on their \
         first attempt",
        holding_since.elapsed()
    );
    worker.shutdown().await.unwrap();
    store.close().await;
    admin.drop_schema().await.unwrap();
}

/// A TCP proxy to the local PostgreSQL server that can stop forwarding on the connections that
/// sent `LISTEN`, without closing them: a half-open connection as a NAT or firewall that
/// forgot it leaves behind.
struct Proxy {
    port: u16,
    /// Ids of the connections that sent `LISTEN`, in order.
    listeners: Arc<Mutex<Vec<usize>>>,
    frozen: Arc<Mutex<HashSet<usize>>>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = socket.local_addr().unwrap().port();
        let listeners = Arc::new(Mutex::new(Vec::new()));
        let frozen = Arc::new(Mutex::new(HashSet::new()));
        let (l, f) = (listeners.clone(), frozen.clone());
        tokio::spawn(async move {
            for id in 0.. {
                let Ok((client, _)) = socket.accept().await else {
                    return;
                };
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, id, Some(l.clone()), f.clone()));
                tokio::spawn(pump(sr, cw, id, None, f.clone()));
            }
        });
        Proxy {
            port,
            listeners,
            frozen,
        }
    }

    /// Every connection that has sent `LISTEN` so far stops forwarding, both ways.
    fn freeze_listeners(&self) {
        let l = self.listeners.lock().unwrap();
        self.frozen.lock().unwrap().extend(l.iter().copied());
    }

    fn listen_connections(&self) -> usize {
        self.listeners.lock().unwrap().len()
    }
}

/// Forwards bytes one way; marks connection `id` a listener when it sends `LISTEN`
/// (`mark`, client to server only); once `id` is frozen, holds everything and never closes.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    id: usize,
    mark: Option<Arc<Mutex<Vec<usize>>>>,
    frozen: Arc<Mutex<HashSet<usize>>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(mark) = &mark
            && buf[..n].windows(7).any(|w| w == b"LISTEN ")
        {
            mark.lock().unwrap().push(id);
        }
        if frozen.lock().unwrap().contains(&id) {
            // Half-open: keep both sockets, forward nothing, ever.
            let _keep = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Median time from enqueue to completion of `n` jobs enqueued one after another.
async fn median_pickup(client: &Client<PgStore>, n: usize) -> Duration {
    let mut took = Vec::new();
    for i in 0..n {
        let start = Instant::now();
        let e = client.enqueue::<Fine>(&(i as i64)).await.unwrap();
        let out = client.wait(e.id, DRAIN).await.unwrap();
        assert_eq!(out.state, MessageState::Completed);
        took.push(start.elapsed());
    }
    took.sort();
    took[n / 2]
}

/// The worker's fallback poll in scenario 6: long, so that a pick-up that came by NOTIFY cannot
/// be mistaken for one that came by the poll, however busy the machine.
const POLL: Duration = Duration::from_secs(10);

/// Scenario 6: the worker's LISTEN connection goes half-open (the proxy stops forwarding
/// without closing). A job enqueued meanwhile still runs (its NOTIFY goes nowhere; it is found
/// when the dead listener is given up, which wakes every receiver, or by the fallback poll);
/// the listener's ping goes unanswered, so the worker opens a new LISTEN connection, and
/// NOTIFY wakes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_listen_connection() {
    let (admin, schema) = pg_store("dray_chaos").await;
    let client = Client::new(admin.clone());
    let upstream = pg_url()
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(5432);
    let proxy = Proxy::start(upstream).await;
    let store = PgStore::builder(format!(
        "postgres://postgres@127.0.0.1:{}/postgres",
        proxy.port
    ))
    .schema(schema.as_str())
    .poll_interval(POLL)
    .listen_check_interval(Duration::from_millis(300))
    .connect()
    .await
    .unwrap();
    let worker = Worker::new(store.clone()).register(Fine).start().unwrap();
    wait_for("the worker to LISTEN", DRAIN, async || {
        proxy.listen_connections() == 1
    })
    .await;
    let before = median_pickup(&client, 9).await;
    proxy.freeze_listeners();
    let frozen = Instant::now();
    // A job enqueued now: its NOTIFY goes nowhere.
    let during = median_pickup(&client, 1).await;
    wait_for("a new LISTEN connection", DRAIN, async || {
        proxy.listen_connections() == 2
    })
    .await;
    let relisten = frozen.elapsed();
    let after = median_pickup(&client, 9).await;
    eprintln!(
        "half-open LISTEN: pick-up {before:?} before, {during:?} while it hung, a new \
         LISTEN after {relisten:?}, pick-up {after:?} after"
    );
    // A poll alone would give about half the poll interval; NOTIFY gives milliseconds (a
    // few hundred on a machine the rest of the suite keeps busy).
    assert!(
        before < POLL / 4 && after < POLL / 4,
        "NOTIFY wakes the worker before the freeze ({before:?}) and after the new LISTEN \
         ({after:?}); a {POLL:?} poll alone gives about half that"
    );
    worker.shutdown().await.unwrap();
    store.close().await;
    admin.drop_schema().await.unwrap();
}

/// libfaketime, which shifts a process's wall clock (Debian package `faketime`).
const FAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Scenario 7: two worker processes whose wall clocks are five hours ahead and five hours
/// behind drain 1,000 jobs and 100 scheduled a second ahead; the one ahead is SIGKILLed a
/// quarter of the way in. Every lease, rescue and due time is decided by the database clock,
/// so nothing runs twice but what the kill made run again, the behind worker rescues the
/// killed one's jobs in time, and no scheduled job starts early or hours late (a few seconds
/// late at most, when it waits its turn behind the backlog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_clocks_hours_off() {
    assert!(
        Path::new(FAKETIME).exists(),
        "{FAKETIME} is missing: install Debian's `faketime` package (.ci/run does)"
    );
    let (store, schema) = pg_store("dray_chaos").await;
    let url = pg_url();
    let client = Client::new(store.clone());
    let skewed = |offset: &str| {
        spawn_env(
            &url,
            &schema,
            "work",
            800,
            &[
                ("LD_PRELOAD", FAKETIME),
                ("FAKETIME", offset),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ],
        )
    };
    let mut ahead = skewed("+5h");
    let behind = skewed("-5h");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for (p, want) in [(&ahead, 5 * 3600), (&behind, -5 * 3600)] {
        assert!(
            (p.clock - now - want).abs() < 60,
            "the faked clock took effect: {} vs {now}",
            p.clock
        );
    }
    let scheduled: Vec<_> = {
        let mut ids = Vec::new();
        for i in 0..100 {
            let e = client
                .enqueue_with::<Effect>(&(100_000 + i), |o| o.delay(Duration::from_secs(1)))
                .await
                .unwrap();
            ids.push(e.id);
        }
        ids
    };
    enqueue(&client, 0, 1000).await;
    let n = 1100;
    wait_for("a quarter of the drain", DRAIN, async || {
        common::pg_effects(&store, "done").await >= n / 4
    })
    .await;
    ahead.kill();
    drained(&client, n, "the worker behind to finish").await;
    let twice = no_job_lost(&client, n, pg_done_per_job(&store).await).await;
    // Start of each scheduled job against its due time, both by the database clock.
    let q = format!(
        "SELECT job_id, (extract(epoch FROM min(at)) * 1000000)::int8 FROM \"{schema}\".crash_effects \
         GROUP BY job_id"
    );
    let started: HashMap<String, i64> =
        dray::sqlx::query_as::<_, (String, i64)>(dray::sqlx::AssertSqlSafe(q))
            .fetch_all(store.pool())
            .await
            .unwrap()
            .into_iter()
            .collect();
    let mut late = Vec::new();
    for id in scheduled {
        let m = client.get(id).await.unwrap().unwrap();
        late.push(started[&id.to_string()] - m.run_at.timestamp_micros());
    }
    late.sort();
    let (first, last) = (late[0], late[late.len() - 1]);
    eprintln!(
        "clocks 5 h ahead and 5 h behind, the one ahead killed: {twice} effects happened twice; \
         scheduled jobs started {:.1} to {:.1} ms after their due time",
        first as f64 / 1000.0,
        last as f64 / 1000.0
    );
    assert!(first >= 0, "no scheduled job started early: {first} µs");
    // Behind a backlog a due job waits its turn (the backlog's jobs were due earlier), so the
    // bound is loose; a due time read off either worker's clock would be 5 h off.
    assert!(
        last < 30_000_000,
        "no scheduled job started hours late: {last} µs"
    );
    drop(behind);
    store.drop_schema().await.unwrap();
}

/// Scenario 10, PostgreSQL: the store connects as a role whose transactions are read-only
/// (`default_transaction_read_only`). An enqueue fails with `read_only`, the worker's claims
/// fail alike and the job enqueued before waits, untouched; once the role is writable again
/// the store's new connections write, and both jobs run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_read_only_role() {
    let (admin, schema) = pg_store("dray_chaos").await;
    let admin_client = Client::new(admin.clone());
    let role = format!("dray_ro_{}", &suffix()[20..]);
    for stmt in [
        format!("CREATE ROLE {role} LOGIN SUPERUSER"),
        format!("ALTER ROLE {role} SET default_transaction_read_only = on"),
    ] {
        dray::sqlx::query(dray::sqlx::AssertSqlSafe(stmt))
            .execute(admin.pool())
            .await
            .unwrap();
    }
    let waiting = admin_client.enqueue::<Fine>(&1).await.unwrap().id;
    let url = pg_url().replacen("postgres@", &format!("{role}@"), 1);
    let store = PgStore::builder(url)
        .schema(schema.as_str())
        .connect()
        .await
        .expect("reading the schema version needs no write");
    let worker = Worker::new(store.clone()).register(Fine).start().unwrap();
    let client = Client::new(store.clone());
    let err = client.enqueue::<Fine>(&2).await.unwrap_err();
    assert_eq!(err.code(), "read_only", "{err}");
    assert!(err.to_string().contains("read-only"), "{err}");
    // The job enqueued before waits where it was.
    let m = admin_client.get(waiting).await.unwrap().unwrap();
    assert_eq!((m.state, m.attempt), (MessageState::Available, 0), "{m:?}");
    let reset = format!("ALTER ROLE {role} RESET default_transaction_read_only");
    dray::sqlx::query(dray::sqlx::AssertSqlSafe(reset))
        .execute(admin.pool())
        .await
        .unwrap();
    let cleared = Instant::now();
    let mut second = None;
    wait_for("an enqueue to succeed again", DRAIN, async || {
        second = client.enqueue::<Fine>(&2).await.ok().map(|e| e.id);
        second.is_some()
    })
    .await;
    for id in [waiting, second.unwrap()] {
        let out = client.wait(id, DRAIN).await.unwrap();
        assert_eq!(out.state, MessageState::Completed);
    }
    eprintln!(
        "read-only role: enqueue refused with read_only; {:?} after the role was made \
         writable, an enqueue succeeded and both jobs ran",
        cleared.elapsed()
    );
    worker.shutdown().await.unwrap();
    store.close().await;
    let drop_role = format!("DROP ROLE {role}");
    dray::sqlx::query(dray::sqlx::AssertSqlSafe(drop_role))
        .execute(admin.pool())
        .await
        .unwrap();
    admin.drop_schema().await.unwrap();
}

/// A tmpfs of `size` mounted on a new temporary directory; unmounted when dropped.
struct TinyDisk {
    dir: tempfile::TempDir,
}

impl TinyDisk {
    fn mount(size: &str) -> TinyDisk {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mounting a tmpfs needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TinyDisk { dir }
    }

    fn grow(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount");
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Carries a payload that fills a disk quickly.
struct Bulky;
impl Job for Bulky {
    const NAME: &'static str = "bulky";
    type Input = String;
    type Output = ();
    async fn run(&self, _ctx: &JobContext, _: String) -> Result<(), JobError> {
        Ok(())
    }
}

/// Scenario 10, SQLite: the file lives on a 2 MB tmpfs. Enqueues fill it until one fails with
/// `storage_full`, leaving nothing of itself behind while every job accepted before waits.
/// Once the file system grows, an enqueue succeeds, a worker runs every accepted job, and the
/// file passes SQLite's integrity check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_disk_full() {
    let disk = TinyDisk::mount("2m");
    let url = format!("sqlite://{}", disk.dir.path().join("full.db").display());
    let store = SqliteStore::open(&url).await.unwrap();
    let client = Client::new(store.clone());
    let payload = "x".repeat(16 * 1024);
    let mut accepted = 0i64;
    let err = loop {
        match client.enqueue::<Bulky>(&payload).await {
            Ok(_) => accepted += 1,
            Err(err) => break err,
        }
        assert!(accepted < 1000, "2 MB never filled up");
    };
    assert_eq!(err.code(), "storage_full", "{err}");
    assert!(err.to_string().contains("out of space"), "{err}");
    let stats = client.queue().stats("default").await.unwrap();
    assert_eq!(
        stats.available, accepted,
        "the refused enqueue left nothing behind"
    );
    let worker = Worker::new(store.clone()).register(Bulky).start().unwrap();
    disk.grow("64m");
    let grown = Instant::now();
    wait_for("an enqueue to succeed again", DRAIN, async || {
        client.enqueue::<Bulky>(&payload).await.is_ok()
    })
    .await;
    drained(&client, accepted + 1, "every accepted job to run").await;
    let check: String = dray::sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(check, "ok");
    eprintln!(
        "SQLite on a full 2 MB tmpfs: {accepted} jobs accepted, the next refused with \
         storage_full; {:?} after the disk grew, an enqueue succeeded and all {} ran",
        grown.elapsed(),
        accepted + 1
    );
    worker.shutdown().await.unwrap();
    store.close().await;
}

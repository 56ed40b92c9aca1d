//! A thousand guest connections through the MITM handler at once: each opens
//! (PROXY header, TLS with the SNI of an allowed upstream name), waits until
//! all are open, then sends its HTTP/1.1 requests on the same connection and
//! reads every response in full. No connection fails, every response is the
//! upstream's, session.db has one row per request once the session is closed,
//! and the process's memory grows by a bounded amount per connection. In a
//! test binary of its own, so that the process's memory is this test's alone.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{http1_when_accepted, Harness};
use http_body_util::BodyExt;
use hyper::header::HOST;
use hyper::{Request, StatusCode};
use net::fixtures::empty_body;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use tokio::sync::Barrier;

/// Guest connections open at once.
const CONNECTIONS: usize = 1000;
/// Requests each connection sends, one after the other (keep-alive).
const REQUESTS_PER_CONNECTION: usize = 2;
/// What the whole process may grow by for each concurrent connection: the
/// guest's TLS client and HTTP/1.1 connection, the handler's TLS server,
/// HTTP/1.1 server and per-connection state, and its share of the upstream
/// connections (both ends, as the upstream fixture lives here too).
const PER_CONNECTION_BUDGET: u64 = 256 * 1024;
/// Allocator arenas, tokio's task and timer structures, pools and caches,
/// independent of the number of connections.
const FIXED_ALLOWANCE: u64 = 64 * 1024 * 1024;
/// Generous deadlines: this runs on loaded CI machines beside other suites.
const DEADLINE: Duration = Duration::from_secs(240);

/// Resident memory of this process now and at its peak (`VmRSS`, `VmHWM`), in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Raise the soft file-descriptor limit to the hard limit (and the hard
/// limit too when it is too low and this process may raise it, as root may):
/// each connection takes a descriptor on the guest side and one on the
/// handler side, and upstream connections take two more each (the handler's
/// and the fixture's).
fn raise_fd_limit(max_upstream_connections: usize) {
    let needed = u64::try_from(2 * CONNECTIONS + 2 * max_upstream_connections + 512).unwrap();
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    let hard = if hard < needed && setrlimit(Resource::RLIMIT_NOFILE, needed, needed).is_ok() { needed } else { hard };
    assert!(
        hard >= needed,
        "RLIMIT_NOFILE hard limit is {hard}; {CONNECTIONS} concurrent connections need about {needed} \
         file descriptors (raise the hard limit, e.g. `ulimit -Hn {needed}`, to run this test)"
    );
    if soft < needed {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    let (raised, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    println!("RLIMIT_NOFILE: soft {soft} (now {raised}), hard {hard}; about {needed} needed");
}

/// What one guest connection did.
#[derive(Debug, Default)]
struct Outcome {
    /// The targets it requested and got the right answer for.
    answered: Vec<String>,
    /// Connects retried because the handler's listen backlog was full.
    connect_retries: usize,
}

/// One guest connection: open, wait for all the others, send the requests,
/// wait for all the others again, close. Always reaches both barriers, so
/// that a failing connection cannot hold up the rest.
async fn guest_connection(
    h: Arc<Harness>,
    c: usize,
    opened: Arc<Barrier>,
    answered: Arc<Barrier>,
) -> Result<Outcome, String> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let connected = http1_when_accepted(&h.guest, "a.test", h.upstream_addr(), deadline).await;
    opened.wait().await;
    let mut outcome = Outcome::default();
    let result = match connected {
        Ok((mut sender, retries)) => {
            outcome.connect_retries = retries;
            let mut result = Ok(());
            for i in 0..REQUESTS_PER_CONNECTION {
                let target = format!("/hello?c={c}&i={i}");
                let request = Request::get(&target).header(HOST, "a.test").body(empty_body()).unwrap();
                let exchange = async {
                    let response = sender.send_request(request).await.map_err(|e| format!("request: {e}"))?;
                    let status = response.status();
                    let body = response.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
                    Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
                };
                match tokio::time::timeout_at(deadline, exchange).await {
                    Ok(Ok((StatusCode::OK, body))) if body == "hello a.test HTTP/1.1" => {
                        outcome.answered.push(target);
                    }
                    Ok(Ok((status, body))) => {
                        result = Err(format!("{target}: {status} {body:?}"));
                        break;
                    }
                    Ok(Err(err)) => {
                        result = Err(format!("{target}: {err}"));
                        break;
                    }
                    Err(_) => {
                        result = Err(format!("{target}: no response within {DEADLINE:?}"));
                        break;
                    }
                }
            }
            answered.wait().await;
            drop(sender);
            result
        }
        Err(err) => {
            answered.wait().await;
            Err(err)
        }
    };
    result.map(|()| outcome).map_err(|err| format!("connection {c}: {err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_guest_connections() {
    let mut max_upstream_connections = 0;
    let h = Harness::start_with(|config| {
        assert!(
            config.max_connections >= CONNECTIONS,
            "the handler serves at most {} connections at once by default; this test opens {CONNECTIONS}",
            config.max_connections
        );
        max_upstream_connections = config.max_upstream_connections;
        config.allowed_networks = vec!["127.0.0.1/32".parse().unwrap()];
        // Generous deadlines only: the point is that nothing fails, not speed.
        config.handshake_timeout = DEADLINE;
        config.connect_timeout = DEADLINE;
        config.response_timeout = DEADLINE;
        config.upstream_connection_wait = DEADLINE;
    })
    .await;
    raise_fd_limit(max_upstream_connections);

    // One request first, so that the leaf certificate, the resolver's cache
    // and the upstream pool exist before the baseline is taken.
    let mut warmup = h.guest.http1("a.test", h.upstream_addr()).await.unwrap();
    let response = warmup.send_request(Request::get("/hello").header(HOST, "a.test").body(empty_body()).unwrap());
    let response = response.await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    drop(warmup);
    assert_eq!(h.wait_net_rows(1).await.len(), 1);
    let (baseline, _) = memory();

    // Sample the resident memory while the connections run.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampled_peak = Arc::new(AtomicU64::new(baseline));
    let sampler = tokio::spawn({
        let (sampling, sampled_peak) = (sampling.clone(), sampled_peak.clone());
        async move {
            while sampling.load(Ordering::SeqCst) {
                sampled_peak.fetch_max(memory().0, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });

    let started = Instant::now();
    let h = Arc::new(h);
    let opened = Arc::new(Barrier::new(CONNECTIONS + 1));
    let answered = Arc::new(Barrier::new(CONNECTIONS + 1));
    let mut guests = tokio::task::JoinSet::new();
    for c in 0..CONNECTIONS {
        guests.spawn(guest_connection(h.clone(), c, opened.clone(), answered.clone()));
    }
    let all_opened = tokio::time::timeout(DEADLINE, opened.wait()).await;
    assert!(all_opened.is_ok(), "the guest connections did not all open within {DEADLINE:?}");
    let open_for = started.elapsed();
    let (rss_open, _) = memory();
    let all_answered = tokio::time::timeout(DEADLINE, answered.wait()).await;
    assert!(all_answered.is_ok(), "the guest connections did not all finish within {DEADLINE:?}");
    let (rss_answered, _) = memory();
    let mut failures = Vec::new();
    let mut requested = BTreeSet::new();
    let mut connect_retries = 0;
    while let Some(done) = guests.join_next().await {
        match done.unwrap() {
            Ok(outcome) => {
                connect_retries += outcome.connect_retries;
                requested.extend(outcome.answered);
            }
            Err(err) => failures.push(err),
        }
    }
    let wall = started.elapsed();
    sampling.store(false, Ordering::SeqCst);
    sampler.await.unwrap();
    let (_, high_water) = memory();
    let peak = sampled_peak.load(Ordering::SeqCst).max(rss_open).max(rss_answered);
    assert!(
        failures.is_empty(),
        "{} of {CONNECTIONS} connections failed; the first ones: {:#?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    let requests = CONNECTIONS * REQUESTS_PER_CONNECTION;
    assert_eq!(requested.len(), requests, "every request answered, each once");

    // Close the session cleanly (every connection's rows are written), then
    // read session.db itself.
    let mut h = Arc::into_inner(h).unwrap();
    h.mitm.take().unwrap().shutdown().await;
    h.dns.take().unwrap().shutdown().await;
    h.db.take().unwrap().close().await.unwrap();
    let db = rusqlite::Connection::open_with_flags(&h.db_path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).unwrap();
    let mut statement = db.prepare("SELECT path, status_code, decision FROM net_events ORDER BY id").unwrap();
    let rows: Vec<(Option<String>, Option<i64>, String)> =
        statement.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap().map(Result::unwrap).collect();
    let flood_rows: Vec<_> = rows.iter().skip(1).collect();
    println!(
        "{CONNECTIONS} connections, {requests} requests in {:.2} s (all open after {:.2} s, {connect_retries} \
         connects retried on a full backlog); {} session.db rows ({} for the flood); upstream: {} connections, \
         at most {} open at once",
        wall.as_secs_f64(),
        open_for.as_secs_f64(),
        rows.len(),
        flood_rows.len(),
        h.upstream.connections_accepted(),
        h.upstream.most_connections_open(),
    );
    assert_eq!(rows.len(), 1 + requests, "one row per request (the warm-up's included)");
    let logged: BTreeSet<String> = flood_rows.iter().filter_map(|(path, _, _)| path.clone()).collect();
    assert_eq!(logged, requested, "a row for every request made");
    for (path, status, decision) in flood_rows {
        assert_eq!((*status, decision.as_str()), (Some(200), "allowed"), "{path:?}");
    }

    let growth = peak.saturating_sub(baseline);
    let high_water_growth = high_water.saturating_sub(baseline);
    let bound = CONNECTIONS as u64 * PER_CONNECTION_BUDGET + FIXED_ALLOWANCE;
    println!(
        "memory: baseline {} KiB; all open +{} KiB, all answered +{} KiB; peak +{} KiB sampled, +{} KiB \
         high-water mark; {} KiB per connection (budget {} KiB per connection + {} MiB, bound {} KiB)",
        baseline / 1024,
        rss_open.saturating_sub(baseline) / 1024,
        rss_answered.saturating_sub(baseline) / 1024,
        growth / 1024,
        high_water_growth / 1024,
        high_water_growth / CONNECTIONS as u64 / 1024,
        PER_CONNECTION_BUDGET / 1024,
        FIXED_ALLOWANCE / 1024 / 1024,
        bound / 1024,
    );
    assert!(
        high_water_growth <= bound,
        "the process grew by {high_water_growth} bytes at its peak for {CONNECTIONS} connections (bound {bound})"
    );
}

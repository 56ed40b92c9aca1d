//! End to end: the library embedded in async code, as an agent platform
//! embeds it. One sandbox; two processes at once, their output streamed
//! while they run, one of them signalled; the sandbox's events followed
//! live; everything started, used and dropped inside a tokio runtime.
//! The sandboxes start from the warm snapshot (a boot is tested elsewhere).

use std::io::{BufRead, BufReader};
use std::time::Duration;

use sandbox::{Command, Image, LogRow, Sandbox, SandboxBuilder, Status};

/// Restored from the warm snapshot, made by a holder the first time.
fn warm(builder: SandboxBuilder) -> SandboxBuilder {
    builder.warm().holder_program(env!("CARGO_BIN_EXE_sandbox-holder"), std::iter::empty::<&str>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_runs_concurrent_processes_and_streams_events_from_async_code() {
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
    assert!(kvm.is_ok(), "this test boots a VM and needs read-write access to /dev/kvm: {:?}", kvm.err());
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_path_buf();
    // Booting blocks for seconds: off the async workers, as any blocking call.
    let instance = tokio::task::spawn_blocking(move || {
        warm(Sandbox::builder(Image::Default).memory_mib(128).data_dir(data_dir)).start()
    })
    .await
    .unwrap()
    .unwrap();
    // The data directory set in code holds the sandbox, and finds it again.
    assert!(instance.dir().starts_with(data.path()), "{}", instance.dir().display());
    let found = Sandbox::find_in(data.path(), &instance.id()[..6]).unwrap();
    assert_eq!(found.id(), instance.id());
    assert!(found.is_running());

    // The events, followed live from another task.
    let mut events = instance.events().unwrap();
    let watcher = tokio::task::spawn_blocking(move || {
        let row = events.next_timeout(Duration::from_secs(300)).unwrap();
        (row, events)
    });

    // Two processes at once: a ticker whose lines arrive while it runs, and a
    // sleeper that is signalled.
    let mut ticker = instance
        .spawn(Command::new("/bin/sh").args(["-c", "for i in 1 2 3; do echo tick$i; sleep 1; done; exit 4"]))
        .unwrap();
    let mut sleeper = instance.spawn(Command::new("/bin/sh").args(["-c", "echo sleeping; exec sleep 600"])).unwrap();
    let ticks = ticker.take_stdout().unwrap();
    let reading = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(ticks).lines();
        let first = lines.next().unwrap().unwrap();
        // The first line came before the command ended: it is still running.
        let running = ticker.wait_timeout(Duration::ZERO).unwrap().is_none();
        let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
        (first, running, rest, ticker)
    });
    let mut sleeping = String::new();
    let mut sleeper_out = BufReader::new(sleeper.take_stdout().unwrap());
    sleeper_out.read_line(&mut sleeping).unwrap();
    assert_eq!(sleeping, "sleeping\n");
    assert!(sleeper.pid().is_some());
    sleeper.signal(libc::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || sleeper.wait()).await.unwrap().unwrap();
    assert_eq!(status, 128 + libc::SIGTERM);

    let (first, running, rest, mut ticker) = reading.await.unwrap();
    assert_eq!(first, "tick1");
    assert!(running, "the first line arrived only after the command ended");
    assert_eq!(rest, ["tick2", "tick3"]);
    assert_eq!(ticker.wait().unwrap(), 4);

    // A blocked lookup shows up in the live events.
    let out = instance.output(Command::new("fetch").arg("https://blocked.library.test/")).unwrap();
    assert_ne!(out.status, Status::Exited(0));
    let (row, mut events) = watcher.await.unwrap();
    let mut rows = vec![row];
    while !rows.iter().flatten().any(|r| matches!(r, LogRow::Dns(d) if d.qname.starts_with("blocked.library.test"))) {
        let next = tokio::task::spawn_blocking(move || (events.next_timeout(Duration::from_secs(60)).unwrap(), events));
        let (row, back) = next.await.unwrap();
        assert!(row.is_some(), "no event for blocked.library.test; got {rows:?}");
        rows.push(row);
        events = back;
    }

    // Shut down from async code: nothing here may block on a runtime.
    let handle = instance.sandbox().clone();
    let console = tokio::task::spawn_blocking(move || instance.shutdown()).await.unwrap().unwrap();
    assert!(!console.is_empty());
    assert!(!handle.is_running());
    // Every row is in the file once shutdown returned; the stream then ends.
    let rest: Vec<LogRow> = handle.events().unwrap().map(|r| r.unwrap()).collect();
    assert!(
        rest.iter().any(|r| matches!(r, LogRow::Dns(d) if d.qname.starts_with("blocked.library.test"))),
        "{rest:?}"
    );
}

/// Dropping a running instance inside a runtime stops it without a panic.
#[tokio::test]
async fn an_instance_dropped_inside_a_runtime_stops_its_vm() {
    let kvm = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm");
    assert!(kvm.is_ok(), "this test boots a VM and needs read-write access to /dev/kvm: {:?}", kvm.err());
    let data = tempfile::tempdir().unwrap();
    let instance = warm(Sandbox::builder(Image::Default).memory_mib(128).data_dir(data.path())).start().unwrap();
    let handle = instance.sandbox().clone();
    assert!(handle.is_running());
    drop(instance);
    assert!(!handle.is_running());
}

//! The filters' real behaviour: each case runs in a child process (this
//! test binary again, running only that test, with [`CHILD`] set to its
//! name), where one thread installs a filter and tries something; the
//! parent checks how the child ended and what it wrote on stderr.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::Output;
use std::sync::{Arc, Condvar, Mutex};

use super::rules::ioctl;
use super::*;

/// Set (to the test's name) in the child process of a test.
const CHILD: &str = "JAIL_SECCOMP_TEST_CHILD";

/// Runs `body` in a child process; in the parent, returns the child's
/// output. `name` is the test function's name. In the child this never
/// returns: the body's end is exit status 0, a panic is status 101.
fn in_child(name: &str, body: impl FnOnce()) -> Output {
    if std::env::var(CHILD).is_ok_and(|v| v == name) {
        body();
        std::process::exit(0);
    }
    let exe = std::env::current_exe().unwrap();
    std::process::Command::new(exe)
        .args([&format!("seccomp::tests::{name}"), "--exact", "--test-threads=1", "--nocapture"])
        .env(CHILD, name)
        .output()
        .unwrap()
}

/// Runs `body` on a new thread that first installs the reporter and the
/// filters of `kinds` (in order), and returns what it returns.
fn on_filtered_thread<T: Send + 'static>(kinds: &[ThreadKind], body: impl FnOnce() -> T + Send + 'static) -> T {
    install_violation_reporter().unwrap();
    let kinds = kinds.to_vec();
    std::thread::spawn(move || {
        for kind in kinds {
            install(kind).unwrap();
        }
        body()
    })
    .join()
    .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The child was stopped by the reporter, which named `call` on `thread`.
fn assert_reported(out: &Output, call: &str, thread: &str) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(BAD_SYSCALL_STATUS), "status {:?}, stderr: {err}", out.status);
    let nr = report::name_to_number(call).unwrap();
    let line = format!("sandbox holder: forbidden system call {nr} ({call}) on thread {thread}; stopping");
    assert!(err.contains(&line), "no line {line:?} in stderr: {err}");
}

fn assert_ok(out: &Output) {
    assert!(out.status.success(), "status {:?}, stderr: {}", out.status, stderr(out));
}

/// A named thread's comm is its name: the reporter prints it.
fn named<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new().name(name.into()).spawn(f).unwrap().join().unwrap()
}

fn execve_true() -> libc::c_long {
    let path = c"/bin/true".as_ptr();
    let argv = [path, std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: valid NUL-terminated path and NULL-terminated argv and envp,
    // which live across the call.
    unsafe { libc::syscall(libc::SYS_execve, path, argv.as_ptr(), envp.as_ptr()) }
}

#[test]
fn vcpu_execve_is_reported() {
    let out = in_child("vcpu_execve_is_reported", || {
        install_violation_reporter().unwrap();
        named("vcpu0", || {
            install(ThreadKind::Vcpu).unwrap();
            execve_true();
        });
        panic!("execve returned");
    });
    assert_reported(&out, "execve", "vcpu0");
}

#[test]
fn handlers_ptrace_is_reported() {
    let out = in_child("handlers_ptrace_is_reported", || {
        install_violation_reporter().unwrap();
        named("net", || {
            install(ThreadKind::Handlers).unwrap();
            // SAFETY: PTRACE_TRACEME takes no pointers.
            unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
        });
        panic!("ptrace returned");
    });
    assert_reported(&out, "ptrace", "net");
}

#[test]
fn handlers_netlink_socket_is_refused() {
    let out = in_child("handlers_netlink_socket_is_refused", || {
        install_violation_reporter().unwrap();
        named("net", || {
            install(ThreadKind::Handlers).unwrap();
            // SAFETY: creates a socket; no pointers.
            unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        });
        panic!("socket(AF_NETLINK) returned");
    });
    assert_reported(&out, "socket", "net");
}

#[test]
fn handlers_fork_style_clone_is_reported() {
    let out = in_child("handlers_fork_style_clone_is_reported", || {
        install_violation_reporter().unwrap();
        named("net", || {
            install(ThreadKind::Handlers).unwrap();
            // SAFETY: a fork-style clone (no CLONE_THREAD); if it were
            // allowed the child would exit at once.
            let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) };
            if pid == 0 {
                // SAFETY: the child ends without touching the parent's state.
                unsafe { libc::_exit(0) };
            }
        });
        panic!("a fork-style clone returned");
    });
    assert_reported(&out, "clone", "net");
}

#[test]
fn handlers_allow_tcp_threads_memory_and_futexes() {
    let out = in_child("handlers_allow_tcp_threads_memory_and_futexes", || {
        let echoed = on_filtered_thread(&[ThreadKind::Holder, ThreadKind::Handlers], || {
            // TCP on 127.0.0.1, both ends.
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            client.set_nodelay(true).unwrap();
            let (mut server, _) = listener.accept().unwrap();
            client.write_all(b"ping").unwrap();
            let mut got = [0u8; 4];
            server.read_exact(&mut got).unwrap();
            // UDP sockets of both families.
            let _udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            // SAFETY: creates a socket; no pointers.
            let v6 = unsafe { libc::socket(libc::AF_INET6, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
            assert!(v6 >= 0, "{}", std::io::Error::last_os_error());
            // SAFETY: closes the socket just made.
            unsafe { libc::close(v6) };
            // A thread, a lock, a condition variable (futexes), memory.
            let pair = Arc::new((Mutex::new(false), Condvar::new()));
            let theirs = Arc::clone(&pair);
            let t = std::thread::spawn(move || {
                let big = vec![7u8; 64 << 20];
                let (lock, cond) = &*theirs;
                *lock.lock().unwrap() = true;
                cond.notify_all();
                big.iter().map(|&b| u64::from(b)).sum::<u64>()
            });
            let (lock, cond) = &*pair;
            let mut done = lock.lock().unwrap();
            while !*done {
                done = cond.wait(done).unwrap();
            }
            drop(done);
            assert_eq!(t.join().unwrap(), 7 * (64 << 20));
            got
        });
        assert_eq!(&echoed, b"ping");
    });
    assert_ok(&out);
}

#[test]
fn vcpu_allows_kvm_run_but_no_other_ioctl() {
    let out = in_child("vcpu_allows_kvm_run_but_no_other_ioctl", || {
        let null = std::fs::File::open("/dev/null").unwrap();
        let fd = null.as_raw_fd();
        install_violation_reporter().unwrap();
        named("vcpu0", move || {
            install(ThreadKind::Vcpu).unwrap();
            // SAFETY: KVM_RUN takes no argument; /dev/null refuses it.
            let rc = unsafe { libc::ioctl(fd, ioctl::KVM_RUN as _, 0) };
            // It reached the device (ENOTTY), it was not trapped.
            assert_eq!((rc, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::ENOTTY)));
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD's argument is an int to write to, which lives
            // across the call; the filter traps the call before that.
            unsafe { libc::ioctl(fd, ioctl::FIONREAD as _, &mut n) };
        });
        panic!("ioctl(FIONREAD) returned");
    });
    assert_reported(&out, "ioctl", "vcpu0");
}

#[test]
fn vcpu_reads_its_state_for_a_snapshot_but_cannot_set_it() {
    let out = in_child("vcpu_reads_its_state_for_a_snapshot_but_cannot_set_it", || {
        let null = std::fs::File::open("/dev/null").unwrap();
        let fd = null.as_raw_fd();
        install_violation_reporter().unwrap();
        named("vcpu0", move || {
            install(ThreadKind::Vcpu).unwrap();
            let mut area = vec![0u8; 4096];
            // SAFETY: KVM_GET_XSAVE writes at most 4 KiB into `area`, which
            // lives across the call; /dev/null refuses it anyway.
            let rc = unsafe { libc::ioctl(fd, ioctl::KVM_GET_XSAVE as _, area.as_mut_ptr()) };
            assert_eq!((rc, std::io::Error::last_os_error().raw_os_error()), (-1, Some(libc::ENOTTY)));
            let state: u32 = 0;
            // SAFETY: KVM_SET_MP_STATE reads a u32 that lives across the
            // call; the filter traps the call before that.
            unsafe { libc::ioctl(fd, ioctl::KVM_SET_MP_STATE as _, &state) };
        });
        panic!("ioctl(KVM_SET_MP_STATE) returned");
    });
    assert_reported(&out, "ioctl", "vcpu0");
}

#[test]
fn vcpu_kvm_run_reaches_the_device() {
    let out = in_child("vcpu_kvm_run_reaches_the_device", || {
        let null = std::fs::File::open("/dev/null").unwrap();
        let fd = null.as_raw_fd();
        let err = on_filtered_thread(&[ThreadKind::Holder, ThreadKind::Vcpu], move || {
            // SAFETY: KVM_RUN takes no argument; /dev/null refuses it.
            let rc = unsafe { libc::ioctl(fd, ioctl::KVM_RUN as _, 0) };
            (rc, std::io::Error::last_os_error().raw_os_error())
        });
        assert_eq!(err, (-1, Some(libc::ENOTTY)));
    });
    assert_ok(&out);
}

#[test]
fn vcpu_cannot_start_threads() {
    let out = in_child("vcpu_cannot_start_threads", || {
        install_violation_reporter().unwrap();
        named("vcpu0", || {
            install(ThreadKind::Vcpu).unwrap();
            let _ = std::thread::spawn(|| {});
        });
        panic!("a vCPU thread started a thread");
    });
    // glibc blocks every signal around its `clone`, so the trap finds
    // SIGSYS blocked: the kernel then kills the process with it, unreported.
    assert_eq!(out.status.signal(), Some(libc::SIGSYS), "status {:?}, stderr: {}", out.status, stderr(&out));
}

#[test]
fn clone3_is_enosys_and_threads_still_start() {
    let out = in_child("clone3_is_enosys_and_threads_still_start", || {
        for kinds in [&[ThreadKind::Holder][..], &[ThreadKind::Holder, ThreadKind::Handlers]] {
            let (rc, errno, joined) = on_filtered_thread(kinds, || {
                // SAFETY: clone3 with no arguments structure: the filter
                // answers before the kernel would read it.
                let rc = unsafe { libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0usize) };
                let errno = std::io::Error::last_os_error().raw_os_error();
                let joined = std::thread::spawn(|| 42).join().unwrap();
                (rc, errno, joined)
            });
            assert_eq!((rc, errno, joined), (-1, Some(libc::ENOSYS), 42), "{kinds:?}");
        }
    });
    assert_ok(&out);
}

#[test]
fn vmm_serves_its_event_loop() {
    let out = in_child("vmm_serves_its_event_loop", || {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        // SAFETY: creates an epoll instance; no pointers.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epoll >= 0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let got = on_filtered_thread(&[ThreadKind::Holder, ThreadKind::Vmm], move || {
            let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: 1 };
            // SAFETY: valid epoll and socket descriptors; `event` lives across the call.
            assert_eq!(unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, b.as_raw_fd(), &mut event) }, 0);
            a.write_all(b"x").unwrap();
            let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
            // SAFETY: the buffer holds 4 events and lives across the call.
            let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), 4, 1000) };
            // A guest connection to a handler's socket, and its accept.
            let client = std::os::unix::net::UnixStream::connect(&path).unwrap();
            let (server, _) = listener.accept().unwrap();
            server.set_nonblocking(true).unwrap();
            drop((client, server));
            n
        });
        assert_eq!(got, 1);
    });
    assert_ok(&out);
}

#[test]
fn vmm_cannot_open_files() {
    let out = in_child("vmm_cannot_open_files", || {
        install_violation_reporter().unwrap();
        named("vm-test", || {
            install(ThreadKind::Vmm).unwrap();
            let _ = std::fs::File::open("/etc/hostname");
        });
        panic!("the event loop opened a file");
    });
    assert_reported(&out, "openat", "vm-test");
}

/// What port forwarding does in a confined holder, without widening any
/// list: the control thread (the holder's filter) makes a socket pair,
/// receives a forward's listening socket with `SCM_RIGHTS` and checks it
/// listens; the handlers' runtime threads accept on it, make the socket
/// non-blocking, connect to the VMM's Unix socket and half-close.
#[test]
fn port_forwarding_needs_nothing_more_than_the_lists_allow() {
    let out = in_child("port_forwarding_needs_nothing_more_than_the_lists_allow", || {
        use std::io::{IoSlice, IoSliceMut};
        use std::os::fd::{FromRawFd, OwnedFd, RawFd};
        use std::os::unix::net::{UnixListener, UnixStream};

        use nix::sys::socket::{getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags};

        let dir = tempfile::tempdir().unwrap();
        let vsock = dir.path().join("vsock.sock");
        let vmm = UnixListener::bind(&vsock).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = on_filtered_thread(&[ThreadKind::Holder], move || {
            let (client, holder) = UnixStream::pair().unwrap();
            let fds = [listener.as_raw_fd()];
            let iov = [IoSlice::new(b"{}\n")];
            sendmsg::<()>(client.as_raw_fd(), &iov, &[ControlMessage::ScmRights(&fds)], MsgFlags::empty(), None)
                .unwrap();
            let mut buf = [0u8; 16];
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([RawFd; 1]);
            let msg =
                recvmsg::<()>(holder.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC).unwrap();
            let mut fds = Vec::new();
            for cmsg in msg.cmsgs().unwrap() {
                if let ControlMessageOwned::ScmRights(list) = cmsg {
                    fds.extend(list);
                }
            }
            // SAFETY: the kernel installed this descriptor for this process just now.
            let fd = unsafe { OwnedFd::from_raw_fd(fds[0]) };
            assert!(getsockopt(&fd, sockopt::AcceptConn).unwrap());
            TcpListener::from(fd)
        });
        let echoed = on_filtered_thread(&[ThreadKind::Holder, ThreadKind::Handlers], move || {
            let mut client = TcpStream::connect(addr).unwrap();
            let (mut accepted, _) = received.accept().unwrap();
            accepted.set_nonblocking(true).unwrap();
            accepted.set_nonblocking(false).unwrap();
            let mut guest = UnixStream::connect(&vsock).unwrap();
            guest.write_all(b"CONNECT 5000\n").unwrap();
            guest.shutdown(std::net::Shutdown::Write).unwrap();
            client.write_all(b"ping").unwrap();
            let mut got = [0u8; 4];
            accepted.read_exact(&mut got).unwrap();
            got
        });
        assert_eq!(&echoed, b"ping");
        drop(vmm);
    });
    assert_ok(&out);
}

#[test]
fn holder_allows_files_but_not_execve() {
    let out = in_child("holder_allows_files_but_not_execve", || {
        install_violation_reporter().unwrap();
        named("holder-test", || {
            install(ThreadKind::Holder).unwrap();
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("state.json"), b"{}").unwrap();
            std::fs::rename(dir.path().join("state.json"), dir.path().join("state2.json")).unwrap();
            assert_eq!(std::fs::read(dir.path().join("state2.json")).unwrap(), b"{}");
            execve_true();
        });
        panic!("execve returned");
    });
    assert_reported(&out, "execve", "holder-test");
}

#[test]
fn executable_mappings_are_refused() {
    let out = in_child("executable_mappings_are_refused", || {
        install_violation_reporter().unwrap();
        named("net", || {
            install(ThreadKind::Handlers).unwrap();
            // SAFETY: an anonymous mapping; nothing is written to it.
            unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
        });
        panic!("an executable mapping was made");
    });
    assert_reported(&out, "mmap", "net");
}

#[test]
fn every_filter_compiles_for_x86_64() {
    for kind in ThreadKind::ALL {
        let program = filter(kind).unwrap();
        assert!(!program.is_empty(), "{kind}");
        // A classic BPF program is at most 4096 instructions.
        assert!(program.len() <= 4096, "{kind}: {} instructions", program.len());
    }
}

#[test]
fn the_holder_allows_every_call_of_every_thread() {
    let holder = rules(ThreadKind::Holder);
    for kind in [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Handlers] {
        for nr in rules(kind).calls() {
            assert!(holder.mentions(nr), "{kind} allows call {nr}, the holder does not");
        }
    }
}

#[test]
fn no_list_allows_the_dangerous_calls() {
    let dangerous = [
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kill,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_keyctl,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_open,
        libc::SYS_setuid,
        libc::SYS_capset,
    ];
    for kind in ThreadKind::ALL {
        let r = rules(kind);
        for nr in dangerous {
            assert!(!r.mentions(nr), "{kind} allows call {nr}");
        }
    }
}

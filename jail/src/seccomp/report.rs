//! What happens when a thread makes a system call its filter does not
//! allow: the filter's action is `SECCOMP_RET_TRAP`, so the kernel sends
//! the thread SIGSYS with the call's number in `siginfo_t`; the handler
//! installed here says which call on which thread, and ends the process
//! with [`BAD_SYSCALL_STATUS`].

use std::sync::atomic::{AtomicBool, Ordering};

use crate::Error;

/// The exit status of a holder stopped for a forbidden system call: the
/// value Firecracker uses for the same event (`FcExitCode::BadSyscall`), and
/// none of the statuses `sandbox` itself exits with.
pub const BAD_SYSCALL_STATUS: i32 = 148;

/// The part of `siginfo_t` the kernel fills for SIGSYS (`_sigsys` in
/// the kernel's union, x86_64 layout): the three `int` header fields, the
/// padding that aligns the union to 8 bytes, then the union.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

// The union starts at offset 16 and `siginfo_t` is 128 bytes, so this view
// stays inside it.
const _: () = assert!(std::mem::size_of::<SigsysInfo>() <= std::mem::size_of::<libc::siginfo_t>());

/// `si_code` of a SIGSYS sent by seccomp.
const SYS_SECCOMP: libc::c_int = 1;

/// The names of the calls a compromised thread is likely to try, and of the
/// common ones; other calls are reported by number.
const NAMES: &[(libc::c_long, &str)] = &[
    (libc::SYS_execve, "execve"),
    (libc::SYS_execveat, "execveat"),
    (libc::SYS_ptrace, "ptrace"),
    (libc::SYS_open, "open"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_openat2, "openat2"),
    (libc::SYS_creat, "creat"),
    (libc::SYS_mount, "mount"),
    (libc::SYS_umount2, "umount2"),
    (libc::SYS_pivot_root, "pivot_root"),
    (libc::SYS_chroot, "chroot"),
    (libc::SYS_setns, "setns"),
    (libc::SYS_unshare, "unshare"),
    (libc::SYS_socket, "socket"),
    (libc::SYS_socketpair, "socketpair"),
    (libc::SYS_connect, "connect"),
    (libc::SYS_bind, "bind"),
    (libc::SYS_listen, "listen"),
    (libc::SYS_clone, "clone"),
    (libc::SYS_clone3, "clone3"),
    (libc::SYS_fork, "fork"),
    (libc::SYS_vfork, "vfork"),
    (libc::SYS_kill, "kill"),
    (libc::SYS_tkill, "tkill"),
    (libc::SYS_ioctl, "ioctl"),
    (libc::SYS_prctl, "prctl"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_bpf, "bpf"),
    (libc::SYS_perf_event_open, "perf_event_open"),
    (libc::SYS_kexec_load, "kexec_load"),
    (libc::SYS_kexec_file_load, "kexec_file_load"),
    (libc::SYS_init_module, "init_module"),
    (libc::SYS_finit_module, "finit_module"),
    (libc::SYS_delete_module, "delete_module"),
    (libc::SYS_process_vm_readv, "process_vm_readv"),
    (libc::SYS_process_vm_writev, "process_vm_writev"),
    (libc::SYS_keyctl, "keyctl"),
    (libc::SYS_add_key, "add_key"),
    (libc::SYS_request_key, "request_key"),
    (libc::SYS_userfaultfd, "userfaultfd"),
    (libc::SYS_io_uring_setup, "io_uring_setup"),
    (libc::SYS_memfd_create, "memfd_create"),
    (libc::SYS_setuid, "setuid"),
    (libc::SYS_setgid, "setgid"),
    (libc::SYS_capset, "capset"),
    (libc::SYS_personality, "personality"),
    (libc::SYS_seccomp, "seccomp"),
    (libc::SYS_mkdir, "mkdir"),
    (libc::SYS_unlink, "unlink"),
    (libc::SYS_rename, "rename"),
    (libc::SYS_link, "link"),
    (libc::SYS_symlink, "symlink"),
    (libc::SYS_chmod, "chmod"),
    (libc::SYS_chown, "chown"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn"),
];

/// The name of system call `nr`, if it is in the table.
pub(crate) fn name(nr: libc::c_long) -> Option<&'static str> {
    NAMES.iter().find(|(n, _)| *n == nr).map(|(_, name)| *name)
}

/// The number of the system call called `name`, if it is in the table.
#[cfg(test)]
pub(crate) fn name_to_number(name: &str) -> Option<libc::c_long> {
    NAMES.iter().find(|(_, n)| *n == name).map(|(nr, _)| *nr)
}

/// A fixed buffer a line is put together in, without allocating.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    const fn new() -> Self {
        Line { buf: [0; 160], len: 0 }
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.len == self.buf.len() {
                return;
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
    }

    fn push_number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The report line for call `nr` on the thread named `thread`.
fn format(nr: i64, thread: &[u8]) -> Line {
    let mut line = Line::new();
    line.push(b"sandbox holder: forbidden system call ");
    line.push_number(nr);
    if let Some(name) = name(nr) {
        line.push(b" (");
        line.push(name.as_bytes());
        line.push(b")");
    }
    line.push(b" on thread ");
    line.push(thread);
    line.push(b"; stopping\n");
    line
}

/// The SIGSYS handler. Async-signal-safe: no allocation, no lock; only
/// `prctl(PR_GET_NAME)`, `write` and `_exit`, which every filter allows.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler;
    // SigsysInfo is a prefix of its layout (checked above) for SIGSYS, and
    // only plain integers are read.
    let (code, nr) = unsafe {
        let sys = info.cast::<SigsysInfo>();
        ((*sys).code, (*sys).syscall)
    };
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer it is given.
    let named = unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) } == 0;
    let thread_name: &[u8] = if named {
        let end = name.iter().position(|&b| b == 0).unwrap_or(16);
        &name[..end]
    } else {
        b"?"
    };
    let line = if code == SYS_SECCOMP {
        format(i64::from(nr), thread_name)
    } else {
        let mut line = Line::new();
        line.push(b"sandbox holder: SIGSYS not from seccomp on thread ");
        line.push(thread_name);
        line.push(b"; stopping\n");
        line
    };
    let bytes = line.bytes();
    // SAFETY: write(2) of a buffer that lives across the call; a short or
    // failed write is of no consequence, the process ends next.
    let _ = unsafe { libc::write(libc::STDERR_FILENO, bytes.as_ptr().cast(), bytes.len()) };
    // SAFETY: _exit is async-signal-safe and ends the process.
    unsafe { libc::_exit(BAD_SYSCALL_STATUS) };
}

static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Installs the SIGSYS handler that reports a forbidden system call and
/// stops the process (for the whole process, as signal handlers are). Call
/// it on the main thread before [`super::install`]: without it a trapped
/// call kills the process with SIGSYS and a core dump, unexplained.
pub fn install_violation_reporter() -> Result<(), Error> {
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    // SAFETY: an all-zero sigaction is a valid value (empty mask, no flags)
    // that is filled in next.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: the mask is a valid sigset_t owned by `action`.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: installs a handler whose body is async-signal-safe (see
    // `on_sigsys`); no old action is asked for.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc != 0 {
        INSTALLED.store(false, Ordering::SeqCst);
        return Err(Error::sys("installing the SIGSYS handler", nix::errno::Errno::last()));
    }
    tracing::debug!("seccomp violation reporter installed");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_known_calls_and_number_others() {
        let line = format(libc::SYS_execve, b"vcpu0");
        assert_eq!(
            std::str::from_utf8(line.bytes()).unwrap(),
            "sandbox holder: forbidden system call 59 (execve) on thread vcpu0; stopping\n"
        );
        let line = format(999, b"net");
        assert_eq!(
            std::str::from_utf8(line.bytes()).unwrap(),
            "sandbox holder: forbidden system call 999 on thread net; stopping\n"
        );
    }

    #[test]
    fn a_long_line_is_cut_not_overflowed() {
        let line = format(0, &[b'x'; 400]);
        assert_eq!(line.bytes().len(), 160);
    }
}

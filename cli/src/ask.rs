//! Answering `ask` rules on the terminal, where the guest writes too.
//!
//! The guest's output goes to the same terminal as the question, so a guest
//! could draw a fake question, or text around a real one, and a keystroke
//! meant for the guest could answer a question. Three things make a
//! question unspoofable here:
//!
//! - **Guest output is paused while a question is on screen.** Everything
//!   that writes guest output to this terminal goes through a
//!   [`GatedWriter`] on the process's [`OutputGate`]; while a question is
//!   asked the writer waits (the guest's stream backs up into the vsock
//!   connection; nothing is buffered here), and resumes after the answer.
//! - **The question starts on a clean line** (attributes reset, line
//!   cleared) and states what would be allowed: method, scheme, host, port,
//!   path and query of a request, type and name of a query
//!   ([`Event::describe`], with guest text escaped).
//! - **A yes is a random token** shown only in that question (`sandbox ask
//!   [k7m2qx]`): the user types the token to allow; `y`, anything else, or no
//!   answer before the timeout blocks. A guest cannot see the host's
//!   terminal, so a fake question it draws cannot carry the real token, and
//!   a `y` typed for the guest answers nothing. (A marker alone, or a prompt
//!   on `/dev/tty`, would not do: the guest can print any marker, and its
//!   output reaches the same terminal.)
//!
//! A question that times out is cancelled: its reader stops polling the
//! terminal within [`POLL_INTERVAL`] and reads nothing more, so it cannot
//! take the answer meant for the next question (or keystrokes meant for
//! the guest). The logic runs on any file descriptors ([`Prompter`]), so it
//! is tested without a terminal.

use std::future::Future;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use sandbox::policy::{Asker, Event};

/// How often a waiting question checks whether it was cancelled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Longest answer line read (a token is 6 characters).
const MAX_ANSWER: usize = 64;
/// Characters a token is made of (no look-alikes: 0/o, 1/l/i).
const TOKEN_ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
const TOKEN_LEN: usize = 6;

/// Pauses guest output while a question is on screen.
#[derive(Debug, Default)]
pub struct OutputGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// A question is on screen.
    asking: bool,
    /// Guest writes in progress: a question waits for them to finish.
    writing: usize,
}

/// Guest output is paused until this is dropped.
#[derive(Debug)]
pub struct Paused<'a> {
    gate: &'a OutputGate,
}

impl OutputGate {
    /// The gate of this process's terminal.
    pub fn terminal() -> Arc<OutputGate> {
        static GATE: OnceLock<Arc<OutputGate>> = OnceLock::new();
        Arc::clone(GATE.get_or_init(|| Arc::new(OutputGate::default())))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Pause guest output: wait for a question already on screen and for
    /// guest writes in progress, so that nothing lands after the question.
    pub fn pause(&self) -> Paused<'_> {
        let mut state = self.lock();
        while state.asking || state.writing > 0 {
            state = self.changed.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state.asking = true;
        Paused { gate: self }
    }

    /// Wait while a question is on screen, then count a write in progress.
    fn begin_write(&self) {
        let mut state = self.lock();
        while state.asking {
            state = self.changed.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state.writing += 1;
    }

    fn end_write(&self) {
        let mut state = self.lock();
        state.writing = state.writing.saturating_sub(1);
        self.changed.notify_all();
    }
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        self.gate.lock().asking = false;
        self.gate.changed.notify_all();
    }
}

/// Guest output on its way to the terminal: held while a question is asked.
#[derive(Debug)]
pub struct GatedWriter<W> {
    inner: W,
    gate: Arc<OutputGate>,
}

impl<W: Write> GatedWriter<W> {
    pub fn new(inner: W, gate: Arc<OutputGate>) -> Self {
        Self { inner, gate }
    }
}

impl<W: Write> Write for GatedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.gate.begin_write();
        let written = self.inner.write(buf);
        self.gate.end_write();
        written
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A fresh random token for one question.
fn token() -> io::Result<String> {
    let mut bytes = [0u8; TOKEN_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| char::from(TOKEN_ALPHABET[usize::from(*b) % TOKEN_ALPHABET.len()])).collect())
}

/// Read one line from `input`, polling so that `cancel` stops it; `None`
/// when cancelled or at end of input. Reads byte by byte and never past the
/// line, so nothing meant for a later reader is taken.
fn read_answer(input: &mut (impl Read + AsFd), cancel: &AtomicBool) -> Option<String> {
    let mut line = Vec::new();
    let ms = u16::try_from(POLL_INTERVAL.as_millis()).unwrap_or(u16::MAX);
    loop {
        if cancel.load(Ordering::SeqCst) {
            return None;
        }
        let ready = {
            let mut fds = [nix::poll::PollFd::new(input.as_fd(), nix::poll::PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)) {
                Ok(n) => n > 0,
                Err(nix::errno::Errno::EINTR) => false,
                Err(_) => return None,
            }
        };
        // Checked again after the wait: a cancelled reader takes nothing.
        if !ready || cancel.load(Ordering::SeqCst) {
            continue;
        }
        let mut byte = [0u8; 1];
        match input.read(&mut byte) {
            Ok(0) => return None,
            Ok(_) if byte[0] == b'\n' || byte[0] == b'\r' => return Some(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) if line.len() < MAX_ANSWER => line.push(byte[0]),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted || e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return None,
        }
    }
}

/// Asks one question on a terminal (or anything with file descriptors).
pub struct Prompter<I, O> {
    pub input: I,
    pub output: O,
    pub gate: Arc<OutputGate>,
}

impl<I, O> std::fmt::Debug for Prompter<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prompter").field("gate", &self.gate).finish_non_exhaustive()
    }
}

impl<I: Read + AsFd, O: Write> Prompter<I, O> {
    /// Ask `question`; true only when the question's token is typed back
    /// before `cancel` is set.
    pub fn ask(&mut self, question: &str, cancel: &AtomicBool) -> bool {
        let Ok(token) = token() else {
            return false;
        };
        let _paused = self.gate.pause();
        let prompt = format!(
            "\r\x1b[0m\x1b[2K\nsandbox ask [{token}] {question}\r\n\
             sandbox ask [{token}] type {token} and Enter to allow; anything else blocks: "
        );
        if self.output.write_all(prompt.as_bytes()).and_then(|()| self.output.flush()).is_err() {
            return false;
        }
        let answer = read_answer(&mut self.input, cancel);
        let allowed = answer.as_deref().is_some_and(|a| a.trim().eq_ignore_ascii_case(&token));
        let outcome = match (&answer, allowed) {
            (None, _) => "no answer in time: blocked",
            (Some(_), true) => "allowed",
            (Some(_), false) => "blocked",
        };
        let _ = write!(self.output, "\r\x1b[2Ksandbox ask [{token}] {outcome}\r\n").and_then(|()| self.output.flush());
        allowed
    }
}

/// Sets its flag when dropped: the question's future was dropped (answered
/// elsewhere or timed out), so its reader must stop.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Something a question can be read from.
pub trait AnswerInput: Read + AsFd + Send {}
impl<T: Read + AsFd + Send> AnswerInput for T {}

/// Opens where questions are asked: (input, output).
pub type OpenTerminal = dyn Fn() -> io::Result<(Box<dyn AnswerInput>, Box<dyn Write + Send>)> + Send + Sync;

/// Answers `ask` rules on a terminal (`/dev/tty` by default).
pub struct TerminalAsker {
    open: Box<OpenTerminal>,
    gate: Arc<OutputGate>,
}

impl std::fmt::Debug for TerminalAsker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TerminalAsker").finish_non_exhaustive()
    }
}

impl TerminalAsker {
    /// Ask on `/dev/tty`, pausing output written through [`OutputGate::terminal`].
    pub fn tty() -> Self {
        Self::new(
            Box::new(|| {
                let tty = std::fs::OpenOptions::new().read(true).write(true).open("/dev/tty")?;
                let output = tty.try_clone()?;
                Ok((Box::new(tty) as Box<dyn AnswerInput>, Box::new(output) as Box<dyn Write + Send>))
            }),
            OutputGate::terminal(),
        )
    }

    /// Ask on what `open` returns, pausing output written through `gate`.
    pub fn new(open: Box<OpenTerminal>, gate: Arc<OutputGate>) -> Self {
        Self { open, gate }
    }
}

impl Asker for TerminalAsker {
    fn ask(&self, event: &Event, rule: Option<&str>) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        let question = format!("allow {} (rule {})?", event.describe(), rule.unwrap_or("-"));
        let cancel = Arc::new(AtomicBool::new(false));
        let guard = CancelOnDrop(Arc::clone(&cancel));
        let opened = (self.open)();
        let gate = Arc::clone(&self.gate);
        Box::pin(async move {
            let _cancel_when_dropped = guard;
            let Ok((input, output)) = opened else {
                return false;
            };
            let mut prompter = Prompter { input, output, gate };
            tokio::task::spawn_blocking(move || prompter.ask(&question, &cancel)).await.unwrap_or(false)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;
    use std::time::Instant;

    use sandbox::policy::{Decision, Engine, Layer, Policy, ProfileSource};

    use super::*;

    /// What was written to the "terminal", shared between writers.
    #[derive(Clone, Default)]
    struct Screen(Arc<Mutex<Vec<u8>>>);

    impl Write for Screen {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Screen {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
        /// The token of the last question on screen.
        fn token(&self) -> Option<String> {
            let text = self.text();
            let start = text.rfind("sandbox ask [")? + "sandbox ask [".len();
            Some(text[start..start + TOKEN_LEN].to_string())
        }
        fn wait_for(&self, what: &str) {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.text().contains(what) {
                assert!(Instant::now() < deadline, "{what:?} never appeared in {:?}", self.text());
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn engine() -> Engine {
        let profile = r#"
[security.rules.http.ask_all]
on = "http.request"
decision = "ask"
"#;
        Engine::builder()
            .profile(Layer::User, ProfileSource::Text { name: "ask.toml".into(), text: profile.into() })
            .build()
            .unwrap()
    }

    fn request(path: &str) -> Event {
        Event::from_json(&format!(
            r#"{{"event": "http.request", "host": "evil.example", "method": "POST", "path": "{path}"}}"#
        ))
        .unwrap()
    }

    /// An asker on one end of a socket pair (the user types into the other)
    /// and a shared screen.
    fn asker(gate: &Arc<OutputGate>, screen: &Screen) -> (TerminalAsker, UnixStream) {
        let (input, keyboard) = UnixStream::pair().unwrap();
        let screen = screen.clone();
        let open: Box<OpenTerminal> = Box::new(move || {
            Ok((
                Box::new(input.try_clone()?) as Box<dyn AnswerInput>,
                Box::new(screen.clone()) as Box<dyn Write + Send>,
            ))
        });
        (TerminalAsker::new(open, Arc::clone(gate)), keyboard)
    }

    #[test]
    fn prompt_cannot_be_spoofed_by_guest_output() {
        let gate = Arc::new(OutputGate::default());
        let screen = Screen::default();
        let (asker, mut keyboard) = asker(&gate, &screen);
        let policy = Policy::with_asker(engine(), Arc::new(asker), Duration::from_secs(30));
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();

        // The guest prints a fake question and then asks its own "[y/N]".
        let mut guest = GatedWriter::new(screen.clone(), Arc::clone(&gate));
        guest.write_all(b"sandbox ask [aaaaaa] allow GET https://pypi.org:443/simple (rule x)?\r\n").unwrap();
        let decision = {
            let policy = policy.clone();
            let event = request("/upload");
            runtime.spawn(async move { policy.decide(&event).await.decision })
        };
        screen.wait_for("anything else blocks: ");
        // While the question is on screen, guest output waits.
        let writer = std::thread::spawn(move || {
            guest.write_all(b"\x1b[2K\rContinue installing? [y/N] ").unwrap();
            guest
        });
        std::thread::sleep(Duration::from_millis(200));
        let text = screen.text();
        assert!(!text.contains("Continue installing"), "guest output appeared during the question: {text:?}");
        // The real question starts on a clean line and says exactly what is asked.
        let question = &text[text.find("\r\x1b[0m\x1b[2K").unwrap()..];
        assert!(question.contains("allow POST https://evil.example:443/upload (rule http.ask_all)?"), "{question:?}");
        // "y" (meant for the guest, or for the fake question) is not a yes.
        keyboard.write_all(b"y\n").unwrap();
        assert_eq!(runtime.block_on(decision).unwrap(), Decision::Block);
        let _guest = writer.join().unwrap();
        assert!(screen.text().ends_with("Continue installing? [y/N] "), "guest output resumes after the answer");

        // Typing the token shown in the real question allows.
        let decision = {
            let event = request("/upload2");
            let policy = policy.clone();
            runtime.spawn(async move { policy.decide(&event).await.decision })
        };
        screen.wait_for("/upload2");
        let token = screen.token().unwrap();
        assert_ne!(token, "aaaaaa");
        keyboard.write_all(format!("{token}\n").as_bytes()).unwrap();
        assert_eq!(runtime.block_on(decision).unwrap(), Decision::Allow);
    }

    /// A guest write already under way when a question comes is finished
    /// before the question is drawn, never after it.
    #[test]
    fn a_write_in_progress_finishes_before_the_question() {
        struct Slow(Screen);
        impl Write for Slow {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                std::thread::sleep(Duration::from_millis(300));
                self.0.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let screen = Screen::default();
        let gate = Arc::new(OutputGate::default());
        let mut guest = GatedWriter::new(Slow(screen.clone()), gate.clone());
        let writer = std::thread::spawn(move || guest.write_all(b"guest output"));
        std::thread::sleep(Duration::from_millis(50));
        let paused = gate.pause();
        screen.clone().write_all(b"|question|").unwrap();
        drop(paused);
        writer.join().unwrap().unwrap();
        assert_eq!(String::from_utf8_lossy(&screen.0.lock().unwrap()), "guest output|question|");
    }

    #[test]
    fn timed_out_prompt_stops_reading_the_terminal() {
        let gate = Arc::new(OutputGate::default());
        let screen = Screen::default();
        let (asker, mut keyboard) = asker(&gate, &screen);
        let asker = Arc::new(asker);
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let hasty = Policy::with_asker(engine(), asker.clone(), Duration::from_millis(200)).remember_answers(false);
        assert_eq!(runtime.block_on(hasty.decide(&request("/first"))).decision, Decision::Block);
        // The first question's reader is gone once its line says so.
        screen.wait_for("no answer in time: blocked");
        // The next question gets the next answer: the old reader takes nothing.
        let patient = Policy::with_asker(engine(), asker, Duration::from_secs(30));
        let decision = {
            let event = request("/second");
            runtime.spawn(async move { patient.decide(&event).await.decision })
        };
        screen.wait_for("/second");
        let token = screen.token().unwrap();
        keyboard.write_all(format!("{token}\n").as_bytes()).unwrap();
        assert_eq!(runtime.block_on(decision).unwrap(), Decision::Allow);
        // And the guest's output flows again.
        let mut guest = GatedWriter::new(screen.clone(), gate);
        guest.write_all(b"after").unwrap();
        assert!(screen.text().ends_with("after"));
    }
}

//! Captured logs: every test process logs at TRACE into one buffer that leak checks scan, and
//! panics are written into it too.

use std::io::Write;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};

#[derive(Clone)]
pub(super) struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    pub(super) fn buffer(&self) -> MutexGuard<'_, Vec<u8>> {
        // Appending bytes leaves nothing half done for a panicking holder.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.buffer().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

pub(super) fn capture() -> &'static Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = Capture(Arc::default());
        let writer = capture.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("trace")
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .try_init();
        install_panic_hook(capture.clone());
        capture
    })
}

/// Chains a hook in front of the default one that writes every panic into the capture buffer,
/// so that leak checks scan panic messages as they scan logs. Panics raised by the test code
/// itself (an assertion that prints the tokens it compared, a leak finding) are recorded by
/// location only: they are the tests' own words, not something the proxy said.
fn install_panic_hook(capture: Capture) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let location = info.location().map_or_else(|| "an unknown place".to_owned(), ToString::to_string);
        let by_tests = info.location().is_some_and(|l| l.file().replace('\\', "/").contains("tests/api/"));
        let line = if by_tests {
            format!("PANIC in the test code at {location}\n")
        } else {
            format!("PANIC in {:?}: {info}\n", std::thread::current().name())
        };
        // try_lock: a panic inside Capture::write must not deadlock on its own lock.
        for _ in 0..10_000 {
            match capture.0.try_lock() {
                Ok(mut buffer) => buffer.extend_from_slice(line.as_bytes()),
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner().extend_from_slice(line.as_bytes()),
                Err(TryLockError::WouldBlock) => {
                    std::thread::yield_now();
                    continue;
                }
            }
            break;
        }
        previous(info);
    }));
}

/// Everything logged so far by this test process.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&capture().buffer()).into_owned()
}

/// Everything logged so far by this test process, as bytes.
pub fn captured_log_bytes() -> Vec<u8> {
    capture().buffer().clone()
}

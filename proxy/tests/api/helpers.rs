//! Test harness: real `redis-server` processes on free ports, `mock-idp` in-process as the
//! upstream, and token-proxy replicas on port 0, all over loopback HTTP.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::GeneralPurpose;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use bytes::Bytes;
use fred::prelude::*;
use mock_idp::{ClientConfig, MockIdp, RunningMockIdp};
use token_proxy::app::Application;
use token_proxy::config::Config;
use token_proxy::metrics::Metrics;

/// Base64 of the 32 bytes "0123456789abcdef0123456789abcdef".
pub const ROOT_SECRET: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// The client secret most tests use: long enough (see [`MIN_CANARY_LEN`]) to be a canary, and
/// plain enough to write into a form body as is.
pub const SECRET: &str = "shared-test-secret-0042";

// ---------------------------------------------------------------------------------------------
// Captured logs: every test process logs at TRACE into one buffer that leak checks scan, and
// panics are written into it too.

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Capture {
    fn buffer(&self) -> MutexGuard<'_, Vec<u8>> {
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

fn capture() -> &'static Capture {
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

// ---------------------------------------------------------------------------------------------
// Canaries: every client secret and access token of this process, and every form in which they
// must never show up in logs, panics, metrics, response bodies or Redis (docs/architecture.md, invariant 4).
//
// `client()` and `spawn_idp()` register client secrets, `proxy_config()` secret settings, and
// tokens come from the record of every mock-idp `spawn_idp()` started, including tokens the test
// never saw. The harness checks by itself: every response `read()` reads, the metrics and the
// new log lines whenever a `TestProxy` stops or is dropped, and a `SAVE`d RDB file plus every
// key and value whenever a `RedisServer` is dropped.

/// Values shorter than this could match by chance, so they are not scanned for.
pub const MIN_CANARY_LEN: usize = 12;

/// Every needle is at least `MIN_CANARY_LEN` long, so sampling 8-byte windows every `STRIDE`
/// bytes sees each occurrence at one of its first `STRIDE` offsets.
const STRIDE: usize = MIN_CANARY_LEN - 8 + 1;
const FILTER_BITS: u32 = 24;

/// The forms in which `value` could leak, each named: raw, escaped (JSON, Debug), URL-encoded
/// (as a form encoder does, and RFC 3986 style; upper- and lowercase hex), hex, as a Debug byte
/// list, and base64 of the raw and URL-encoded values, in the standard and URL-safe alphabets,
/// padded or not, and at each of the 3 alignments inside a longer encoded text (a secret in a
/// Basic header, `base64(id:secret)`, is encoded at an offset). Forms shorter than
/// [`MIN_CANARY_LEN`] are left out.
pub fn leak_forms(value: &str) -> Vec<(String, Vec<u8>)> {
    let mut forms: Vec<(String, Vec<u8>)> = Vec::new();
    let mut push = |name: String, bytes: Vec<u8>| {
        if bytes.len() >= MIN_CANARY_LEN && !forms.iter().any(|(_, known)| *known == bytes) {
            forms.push((name, bytes));
        }
    };
    let json = serde_json::to_string(value).unwrap();
    let debug = format!("{value:?}");
    let mut form = String::new();
    shared::form::encode_component(value, &mut form);
    let percent = percent_encode(value);
    let texts = [
        ("raw", value.to_owned()),
        ("JSON-escaped", json[1..json.len() - 1].to_owned()),
        ("Debug-escaped", debug[1..debug.len() - 1].to_owned()),
        ("form-urlencoded", form.clone()),
        ("form-urlencoded (lowercase hex)", lowercase_escapes(&form)),
        ("percent-encoded", percent.clone()),
        ("percent-encoded (lowercase hex)", lowercase_escapes(&percent)),
    ];
    for (name, text) in &texts {
        push((*name).to_owned(), text.as_bytes().to_vec());
    }
    push("hex".to_owned(), hex::encode(value).into_bytes());
    push("hex (uppercase)".to_owned(), hex::encode_upper(value).into_bytes());
    push("a Debug byte list".to_owned(), format!("{:?}", value.as_bytes()).into_bytes());
    let mut encoded_texts: Vec<(&str, &str)> = Vec::new();
    for (name, text) in [("raw", value), ("form-urlencoded", form.as_str()), ("percent-encoded", percent.as_str())] {
        if !encoded_texts.iter().any(|(_, known)| *known == text) {
            encoded_texts.push((name, text));
        }
    }
    let alphabets: [(&str, &GeneralPurpose, &GeneralPurpose); 2] =
        [("standard", &STANDARD, &STANDARD_NO_PAD), ("URL-safe", &URL_SAFE, &URL_SAFE_NO_PAD)];
    for (name, text) in encoded_texts {
        for (alphabet, padded, unpadded) in alphabets {
            push(format!("base64 ({alphabet}, padded) of the {name} value"), padded.encode(text).into_bytes());
            push(format!("base64 ({alphabet}, unpadded) of the {name} value"), unpadded.encode(text).into_bytes());
            for offset in 0..3 {
                push(
                    format!("base64 ({alphabet}) of the {name} value at offset {offset} inside a longer text"),
                    base64_fragment(unpadded, text.as_bytes(), offset),
                );
            }
        }
    }
    forms
}

/// The forms of an access token: those of [`leak_forms`] and its JWT signature segment alone.
pub fn token_forms(token: &str) -> Vec<(String, Vec<u8>)> {
    let mut forms = leak_forms(token);
    if let Some((_, signature)) = token.rsplit_once('.') {
        if signature.len() >= MIN_CANARY_LEN && !forms.iter().any(|(_, known)| known == signature.as_bytes()) {
            forms.push(("the JWT signature segment alone".to_owned(), signature.as_bytes().to_vec()));
        }
    }
    forms
}

/// The base64 characters of `value` that do not depend on the bytes around it when it sits
/// `offset` bytes into a longer encoded text: those whose 6 bits all come from `value`.
fn base64_fragment(engine: &GeneralPurpose, value: &[u8], offset: usize) -> Vec<u8> {
    let mut input = vec![0u8; offset];
    input.extend_from_slice(value);
    let encoded = engine.encode(&input).into_bytes();
    let first = (8 * offset).div_ceil(6);
    let end = (8 * (offset + value.len()) / 6).max(first);
    encoded[first..end].to_vec()
}

/// RFC 3986 percent-encoding: everything but ALPHA, DIGIT and `-._~` escaped, space as `%20`.
fn percent_encode(value: &str) -> String {
    let mut out = String::new();
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `%2F` → `%2f`.
fn lowercase_escapes(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut hex_left = 0;
    for c in encoded.chars() {
        if hex_left > 0 {
            out.push(c.to_ascii_lowercase());
            hex_left -= 1;
        } else {
            out.push(c);
            if c == '%' {
                hex_left = 2;
            }
        }
    }
    out
}

/// The `client_id` claim of a JWT, for naming its owner in a finding.
fn token_client(token: &str) -> String {
    let claims = token.split('.').nth(1).and_then(|segment| URL_SAFE_NO_PAD.decode(segment).ok());
    let claims: Option<serde_json::Value> = claims.and_then(|json| serde_json::from_slice(&json).ok());
    claims.and_then(|c| c["client_id"].as_str().map(str::to_owned)).unwrap_or_else(|| "an unknown client".to_owned())
}

/// One secret value: what it is (safe to print) and the forms it must never appear in.
#[derive(Debug)]
pub struct Canary {
    /// E.g. "the client secret of `app`": never the value itself.
    pub what: String,
    pub forms: Vec<(String, Vec<u8>)>,
}

/// Where a canary was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finding {
    pub canary: usize,
    pub form: usize,
    pub at: usize,
    pub len: usize,
}

/// A set of canaries and a search for all their forms at once: 8-byte windows of the haystack,
/// sampled every `STRIDE` bytes, go through a bit filter and then a map to the needles that
/// hold that window at one of their first `STRIDE` offsets. Fast enough (in a debug build) to
/// scan everything the whole suite logs.
pub struct Canaries {
    canaries: Vec<Canary>,
    /// (canary, form) of each needle.
    needles: Vec<(usize, usize)>,
    /// A window's bytes → (needle, offset of the window in the needle).
    keys: HashMap<u64, Vec<(usize, usize)>>,
    filter: Vec<u64>,
    longest: usize,
}

impl Default for Canaries {
    fn default() -> Canaries {
        Canaries {
            canaries: Vec::new(),
            needles: Vec::new(),
            keys: HashMap::new(),
            filter: vec![0; 1 << (FILTER_BITS - 6)],
            longest: 0,
        }
    }
}

fn filter_bit(key: u64) -> usize {
    (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - FILTER_BITS)) as usize
}

fn window(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

impl Canaries {
    pub fn new() -> Canaries {
        Canaries::default()
    }

    /// Adds a canary; forms shorter than [`MIN_CANARY_LEN`] are dropped. Returns its index.
    pub fn add(&mut self, what: String, forms: Vec<(String, Vec<u8>)>) -> usize {
        let canary = self.canaries.len();
        let forms: Vec<_> = forms.into_iter().filter(|(_, bytes)| bytes.len() >= MIN_CANARY_LEN).collect();
        for (form, (_, bytes)) in forms.iter().enumerate() {
            let needle = self.needles.len();
            self.needles.push((canary, form));
            self.longest = self.longest.max(bytes.len());
            for offset in 0..STRIDE {
                let key = window(bytes, offset);
                let bit = filter_bit(key);
                self.filter[bit >> 6] |= 1 << (bit & 63);
                self.keys.entry(key).or_default().push((needle, offset));
            }
        }
        self.canaries.push(Canary { what, forms });
        canary
    }

    /// A client secret; `None` (nothing added) when it is shorter than [`MIN_CANARY_LEN`].
    pub fn add_secret(&mut self, client_id: &str, secret: &str) -> Option<usize> {
        (secret.len() >= MIN_CANARY_LEN)
            .then(|| self.add(format!("the client secret of `{client_id}`"), leak_forms(secret)))
    }

    /// An access token, named after its `client_id` claim.
    pub fn add_token(&mut self, token: &str) -> usize {
        self.add(format!("an access token issued to `{}`", token_client(token)), token_forms(token))
    }

    pub fn canary(&self, index: usize) -> &Canary {
        &self.canaries[index]
    }

    /// Every occurrence of every form, by position (the longest form first at one position).
    pub fn find_all(&self, haystack: &[u8]) -> Vec<Finding> {
        let mut found = Vec::new();
        if self.needles.is_empty() {
            return found;
        }
        let mut at = 0;
        while at + 8 <= haystack.len() {
            let key = window(haystack, at);
            let bit = filter_bit(key);
            if self.filter[bit >> 6] & (1 << (bit & 63)) != 0 {
                for &(needle, offset) in self.keys.get(&key).map_or(&[][..], Vec::as_slice) {
                    let Some(start) = at.checked_sub(offset) else { continue };
                    let (canary, form) = self.needles[needle];
                    let bytes = &self.canaries[canary].forms[form].1;
                    if haystack[start..].starts_with(bytes) {
                        found.push(Finding { canary, form, at: start, len: bytes.len() });
                    }
                }
            }
            at += STRIDE;
        }
        found.sort_by_key(|f| (f.at, std::cmp::Reverse(f.len)));
        found
    }

    /// `haystack` with every occurrence of every form replaced by `[CANARY]`.
    pub fn redact(&self, haystack: &[u8]) -> String {
        let mut masked = vec![false; haystack.len()];
        for f in self.find_all(haystack) {
            masked[f.at..f.at + f.len].iter_mut().for_each(|m| *m = true);
        }
        let mut out = Vec::with_capacity(haystack.len());
        let mut i = 0;
        while i < haystack.len() {
            if masked[i] {
                out.extend_from_slice(b"[CANARY]");
                while i < haystack.len() && masked[i] {
                    i += 1;
                }
            } else {
                out.push(haystack[i]);
                i += 1;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// `Err` with a message naming what leaked where, in which form, and (for text) the
    /// surrounding line with every canary redacted. Never the value itself.
    pub fn check(&self, place: &str, haystack: &[u8], text: bool) -> Result<(), String> {
        self.check_after(place, haystack, text, 0)
    }

    /// Like [`Canaries::check`], ignoring findings that end at or before `fresh_from`: a
    /// rescanned overlap with the previous chunk.
    fn check_after(&self, place: &str, haystack: &[u8], text: bool, fresh_from: usize) -> Result<(), String> {
        let mut found = self.find_all(haystack);
        found.retain(|f| f.at + f.len > fresh_from);
        let Some(first) = found.first().copied() else { return Ok(()) };
        let canary = &self.canaries[first.canary];
        let mut message = format!(
            "LEAK: {place} contains {} as {} (at byte {} of {} scanned)",
            canary.what,
            canary.forms[first.form].0,
            first.at,
            haystack.len()
        );
        let others: BTreeSet<&str> = found.iter().map(|f| self.canaries[f.canary].what.as_str()).collect();
        if found.len() > 1 {
            message.push_str(&format!("; {} findings in all, of {} canaries", found.len(), others.len()));
        }
        if text {
            message.push_str(&format!(
                "; around it, every canary replaced by [CANARY]: {}",
                self.excerpt(haystack, first)
            ));
        }
        Err(message)
    }

    /// Panics with [`Canaries::check`]'s message if `haystack` holds any form of any canary.
    pub fn assert_clean(&self, place: &str, haystack: &[u8]) {
        if let Err(message) = self.check(place, haystack, true) {
            panic!("{message}");
        }
    }

    /// The line around a finding, at most 300 bytes either side, redacted. Redaction looks at
    /// a wider window than it shows, so a canary cut by the edge is still masked.
    fn excerpt(&self, haystack: &[u8], finding: Finding) -> String {
        let margin = 300;
        let wide_start = finding.at.saturating_sub(margin + self.longest);
        let wide_end = (finding.at + finding.len + margin + self.longest).min(haystack.len());
        let line_start = haystack[..finding.at].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let line_end =
            haystack[finding.at..].iter().position(|&b| b == b'\n').map_or(haystack.len(), |i| finding.at + i);
        let start = line_start.max(finding.at.saturating_sub(margin));
        let end = line_end.min(finding.at + finding.len + margin);
        let wide = &haystack[wide_start..wide_end];
        let mut masked = vec![false; wide.len()];
        for f in self.find_all(wide) {
            masked[f.at..f.at + f.len].iter_mut().for_each(|m| *m = true);
        }
        let mut out = Vec::new();
        let mut previous_masked = false;
        for i in start..end {
            let m = masked[i - wide_start];
            if m && !previous_masked {
                out.extend_from_slice(b"[CANARY]");
            } else if !m {
                out.push(haystack[i]);
            }
            previous_masked = m;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// The process-wide registry of canaries.
struct Registry {
    canaries: Canaries,
    /// A secret value → its canary and the clients (or settings) that use it.
    secrets: HashMap<String, (usize, Vec<String>)>,
    tokens: usize,
    /// Clients whose secret is too short to scan for.
    short: BTreeSet<String>,
    /// Every mock-idp started by `spawn_idp`, and how many of its tokens are registered.
    idps: Vec<(MockIdp, usize)>,
    /// How much of the capture buffer has been scanned.
    logs_scanned_to: usize,
    checks: usize,
    bytes_scanned: usize,
}

fn registry() -> MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    capture();
    REGISTRY
        .get_or_init(|| {
            Mutex::new(Registry {
                canaries: Canaries::new(),
                secrets: HashMap::new(),
                tokens: 0,
                short: BTreeSet::new(),
                idps: Vec::new(),
                logs_scanned_to: 0,
                checks: 0,
                bytes_scanned: 0,
            })
        })
        .lock()
        // A panic is only ever raised after the lock is released.
        .unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    /// Registers a secret used by `owner` (a client id, or a setting's name).
    fn secret(&mut self, owner: String, secret: &str, what: impl Fn(&str) -> String) {
        if secret.len() < MIN_CANARY_LEN {
            self.short.insert(owner);
            return;
        }
        if let Some((canary, owners)) = self.secrets.get_mut(secret) {
            if !owners.contains(&owner) {
                owners.push(owner);
                self.canaries.canaries[*canary].what = what(&owners.join("`, `"));
            }
            return;
        }
        let canary = self.canaries.add(what(&owner), leak_forms(secret));
        self.secrets.insert(secret.to_owned(), (canary, vec![owner]));
    }

    /// Registers the tokens the known mock-idps issued since the last call. Tokens are
    /// recorded before anyone sees them, so a token this finds was issued after the previous
    /// call read the log length: every log line that can mention it is still to be scanned.
    fn sync_tokens(&mut self) {
        let mut new = Vec::new();
        for (idp, known) in &mut self.idps {
            let tokens = idp.issued_tokens_since(*known);
            *known += tokens.len();
            new.extend(tokens);
        }
        for token in new {
            self.canaries.add_token(&token);
            self.tokens += 1;
        }
    }

    fn check(&mut self, place: &str, haystack: &[u8], text: bool) -> Result<(), String> {
        self.check_after(place, haystack, text, 0)
    }

    fn check_after(&mut self, place: &str, haystack: &[u8], text: bool, fresh_from: usize) -> Result<(), String> {
        self.sync_tokens();
        self.checks += 1;
        self.bytes_scanned += haystack.len() - fresh_from;
        self.canaries.check_after(place, haystack, text, fresh_from)
    }
}

/// Registers a client secret (once per value; values shorter than [`MIN_CANARY_LEN`] are
/// noted and skipped).
pub fn register_secret(client_id: &str, secret: &str) {
    registry().secret(client_id.to_owned(), secret, |owners| format!("the client secret of `{owners}`"));
}

/// Counts of what the leak checks have looked for so far in this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryStats {
    /// Distinct secret values (client secrets and secret settings) scanned for.
    pub secrets: usize,
    /// Distinct access tokens scanned for.
    pub tokens: usize,
    /// Clients (or settings) whose secret is too short to scan for.
    pub short: Vec<String>,
    pub checks: usize,
    pub bytes_scanned: usize,
}

pub fn canary_stats() -> CanaryStats {
    let mut registry = registry();
    registry.sync_tokens();
    CanaryStats {
        secrets: registry.secrets.len(),
        tokens: registry.tokens,
        short: registry.short.iter().cloned().collect(),
        checks: registry.checks,
        bytes_scanned: registry.bytes_scanned,
    }
}

/// Scans `haystack` for every registered secret and token (text: a failure shows the
/// surrounding line, redacted). Panics with a message naming what leaked into `place`.
pub fn check_no_leak(place: &str, haystack: &[u8]) {
    let result = registry().check(place, haystack, true);
    if let Err(message) = result {
        panic!("{message}");
    }
}

/// Scans everything logged (and every panic) since the previous call for every registered
/// secret and token. Secrets are registered before they are used and tokens before anyone sees
/// them, so scanning each log byte once, against everything registered by then, is enough.
pub fn check_logs() {
    let result = {
        let mut registry = registry();
        // Read the length before registering new tokens (see `Registry::sync_tokens`).
        let end = capture().buffer().len();
        registry.sync_tokens();
        // From a little before the previous end, for a canary written across it.
        let previous_end = registry.logs_scanned_to;
        let start = previous_end.saturating_sub(registry.canaries.longest.saturating_sub(1));
        let chunk = capture().buffer()[start..end].to_vec();
        registry.logs_scanned_to = end;
        registry.check_after("the captured logs (and panic messages)", &chunk, true, previous_end - start)
    };
    if let Err(message) = result {
        panic!("{message}");
    }
}

/// Scans a response's headers and body. A successful token response may of course hold its own
/// token; nothing else.
fn check_reply(reply: &TokenReply) {
    let mut headers = Vec::new();
    for (name, value) in &reply.headers {
        headers.extend_from_slice(name.as_str().as_bytes());
        headers.extend_from_slice(b": ");
        headers.extend_from_slice(value.as_bytes());
        headers.push(b'\n');
    }
    check_no_leak(&format!("the headers of a {} response", reply.status), &headers);
    let body = match reply.body["access_token"].as_str() {
        Some(token) if (200..300).contains(&reply.status) => reply.raw.replace(token, "[its own token]"),
        _ => reply.raw.clone(),
    };
    check_no_leak(&format!("the body of a {} response", reply.status), body.as_bytes());
}

// ---------------------------------------------------------------------------------------------
// Redis

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A `redis-server` owned by one test; killed (by pid) when dropped. It runs with
/// `rdbcompression no` and its own directory, so that a `SAVE`d RDB file holds every key and
/// value as raw bytes: on drop (unless killed, or the test is failing already) the harness
/// saves one and scans it, and every key and value, for canaries.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: std::path::PathBuf,
    /// More `redis-server` arguments, e.g. `--requirepass`.
    extra_args: Vec<String>,
}

impl RedisServer {
    pub async fn start() -> RedisServer {
        RedisServer::start_with(&[]).await
    }

    pub async fn start_with(extra_args: &[&str]) -> RedisServer {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("tp-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let extra_args = extra_args.iter().map(|a| (*a).to_owned()).collect();
        let mut server = RedisServer { port, child: None, dir, extra_args };
        server.spawn().await;
        server
    }

    async fn spawn(&mut self) {
        // A restarted server starts empty, whatever a leak check saved before.
        let _ = std::fs::remove_file(self.rdb_path());
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--rdbcompression", "no", "--dbfilename", "dump.rdb"])
            .args(&self.extra_args)
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (the README's test command installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start on port {}", self.port);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// SIGKILL: the server vanishes without a goodbye.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty: it keeps nothing on disk).
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// SIGSTOP: the server freezes with its connections open.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// A fresh client for inspecting and tampering with what the proxy stored.
    pub async fn client(&self) -> Client {
        let client = Client::new(fred::prelude::Config::from_url(&self.url()).unwrap(), None, None, None);
        client.init().await.unwrap();
        client
    }

    fn rdb_path(&self) -> std::path::PathBuf {
        self.dir.join("dump.rdb")
    }

    /// `SAVE`, then the RDB file's bytes (uncompressed: every key and value is in it as is).
    pub fn rdb(&self) -> Vec<u8> {
        self.try_rdb().unwrap_or_else(|err| panic!("SAVE on the Redis on port {}: {err}", self.port))
    }

    fn try_rdb(&self) -> std::io::Result<Vec<u8>> {
        RespConnection::open(self.port)?.call(&[b"SAVE"])?;
        std::fs::read(self.rdb_path())
    }

    /// Every key with every value in it (all types: a hash gives its fields and values), read
    /// without the async runtime, so that `Drop` can use it too.
    pub fn contents(&self) -> Vec<RedisEntry> {
        self.try_contents().unwrap_or_else(|err| panic!("reading the Redis on port {}: {err}", self.port))
    }

    fn try_contents(&self) -> std::io::Result<Vec<RedisEntry>> {
        let mut redis = RespConnection::open(self.port)?;
        let mut out = Vec::new();
        for key in redis.call(&[b"KEYS", b"*"])?.flatten() {
            let kind = redis.call(&[b"TYPE", &key])?.flatten().concat();
            let values = match kind.as_slice() {
                b"string" => redis.call(&[b"GET", &key])?,
                b"hash" => redis.call(&[b"HGETALL", &key])?,
                b"list" => redis.call(&[b"LRANGE", &key, b"0", b"-1"])?,
                b"set" => redis.call(&[b"SMEMBERS", &key])?,
                b"zset" => redis.call(&[b"ZRANGE", &key, b"0", b"-1", b"WITHSCORES"])?,
                b"none" => Reply::Nil,
                _ => redis.call(&[b"DUMP", &key])?,
            };
            out.push((key, values.flatten()));
        }
        Ok(out)
    }

    /// The drop-time check: a saved RDB file and every key and value, scanned for canaries.
    fn leak_check(&self) -> Result<(), String> {
        let failed = |err: std::io::Error| format!("the leak check of the Redis on port {}: {err}", self.port);
        let rdb = self.try_rdb().map_err(failed)?;
        let contents = self.try_contents().map_err(failed)?;
        let mut registry = registry();
        registry.check(&format!("the RDB file of the Redis on port {}", self.port), &rdb, false)?;
        for (key, values) in contents {
            registry.check(&format!("a key of the Redis on port {}", self.port), &key, false)?;
            for value in values {
                registry.check(&format!("a value in the Redis on port {}", self.port), &value, false)?;
            }
        }
        Ok(())
    }

    /// Every string key (entries and locks; not the purge hash) and its value.
    pub async fn dump(&self) -> Vec<(Bytes, Bytes)> {
        let client = self.client().await;
        let keys: Vec<Bytes> = client.custom(fred::cmd!("KEYS"), vec!["*"]).await.unwrap();
        let mut out = Vec::new();
        for key in keys {
            let kind: String = client.custom(fred::cmd!("TYPE"), vec![key.clone()]).await.unwrap();
            if kind != "string" {
                continue;
            }
            let value: Option<Bytes> = client.get(key.clone()).await.unwrap();
            out.push((key, value.unwrap_or_default()));
        }
        out
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        // Panicking in a drop that runs because of a panic would abort the whole run.
        let checked = if self.child.is_some() && !std::thread::panicking() {
            if let Some(child) = &self.child {
                // A test may have left it frozen.
                let _ = Command::new("kill").args(["-CONT", &child.id().to_string()]).status();
            }
            Some(self.leak_check())
        } else {
            None
        };
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
        if let Some(Err(message)) = checked {
            panic!("{message}");
        }
        if checked.is_some() {
            check_logs();
        }
    }
}

/// A key and every string in its value (one for a string; fields and values for a hash).
pub type RedisEntry = (Vec<u8>, Vec<Vec<u8>>);

/// A blocking RESP2 connection, for the checks that run in `Drop`.
struct RespConnection {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

/// A RESP2 reply; errors are `Err` of [`RespConnection::call`].
enum Reply {
    Nil,
    Integer(i64),
    Bytes(Vec<u8>),
    Array(Vec<Reply>),
}

impl Reply {
    /// Every string in it, depth first.
    fn flatten(self) -> Vec<Vec<u8>> {
        match self {
            Reply::Nil => Vec::new(),
            Reply::Integer(n) => vec![n.to_string().into_bytes()],
            Reply::Bytes(bytes) => vec![bytes],
            Reply::Array(items) => items.into_iter().flat_map(Reply::flatten).collect(),
        }
    }
}

impl RespConnection {
    fn open(port: u16) -> std::io::Result<RespConnection> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(RespConnection { reader: BufReader::new(stream.try_clone()?), writer: stream })
    }

    fn call(&mut self, args: &[&[u8]]) -> std::io::Result<Reply> {
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg);
            request.extend_from_slice(b"\r\n");
        }
        self.writer.write_all(&request)?;
        self.reply()
    }

    fn reply(&mut self) -> std::io::Result<Reply> {
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        let mut line = Vec::new();
        self.reader.read_until(b'\n', &mut line)?;
        let Some(body) = line.strip_suffix(b"\r\n") else { return Err(bad("a reply line without CRLF")) };
        let (&kind, rest) = body.split_first().ok_or_else(|| bad("an empty reply line"))?;
        let text = String::from_utf8_lossy(rest).into_owned();
        let number = || text.parse::<i64>().map_err(|_| bad("a bad length or integer"));
        match kind {
            b'+' => Ok(Reply::Bytes(rest.to_vec())),
            b'-' => Err(std::io::Error::other(format!("Redis said: {text}"))),
            b':' => Ok(Reply::Integer(number()?)),
            b'$' => match usize::try_from(number()?) {
                Err(_) => Ok(Reply::Nil),
                Ok(len) => {
                    let mut bytes = vec![0; len + 2];
                    self.reader.read_exact(&mut bytes)?;
                    bytes.truncate(len);
                    Ok(Reply::Bytes(bytes))
                }
            },
            b'*' => match usize::try_from(number()?) {
                Err(_) => Ok(Reply::Nil),
                Ok(len) => (0..len).map(|_| self.reply()).collect::<std::io::Result<_>>().map(Reply::Array),
            },
            _ => Err(bad("an unknown reply type")),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// mock-idp and token-proxy

/// A mock-idp client; its secret becomes a canary (if at least [`MIN_CANARY_LEN`] long).
pub fn client(id: &str, secret: &str) -> ClientConfig {
    register_secret(id, secret);
    ClientConfig::new(id, secret, &["api/read", "api/write"])
}

/// `POST /admin/purge` with `body`, as `bearer` (if any): the status and the JSON answer,
/// which is checked for canaries.
pub async fn purge(admin: SocketAddr, bearer: Option<&str>, body: &str) -> (u16, serde_json::Value) {
    let mut request = http().post(format!("http://{admin}/admin/purge")).body(body.to_owned());
    if let Some(bearer) = bearer {
        request = request.header("authorization", format!("Bearer {bearer}"));
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    check_no_leak("a purge answer", text.as_bytes());
    (status, serde_json::from_str(&text).unwrap_or_default())
}

/// A mock-idp for these clients, whose secrets and every token it issues become canaries.
pub async fn spawn_idp(clients: Vec<ClientConfig>) -> RunningMockIdp {
    for client in &clients {
        register_secret(&client.client_id, &client.client_secret);
    }
    let config = mock_idp::Config { record_tokens: true, ..mock_idp::Config::for_tests(clients) };
    let idp = mock_idp::spawn(config).await.expect("mock-idp starts");
    // Before anyone knows its address, so before it has issued anything.
    registry().idps.push((idp.idp.clone(), 0));
    idp
}

/// Settings whose value is a secret, and so a canary: the root secret(s), the admin token.
fn is_secret_setting(name: &str) -> bool {
    (name.contains("SECRET") || name.contains("ADMIN_TOKEN")) && !name.ends_with("_FILE")
}

/// Builds a proxy config: loopback port 0, the given upstream, no drain delay, then the overrides.
pub fn proxy_config(upstream: &str, overrides: &[(&str, &str)]) -> Config {
    let mut vars: HashMap<String, String> = HashMap::from([
        ("TOKEN_PROXY_UPSTREAM_URL".into(), upstream.to_owned()),
        ("TOKEN_PROXY_LISTEN".into(), "127.0.0.1:0".into()),
        ("TOKEN_PROXY_ADMIN_LISTEN".into(), "127.0.0.1:0".into()),
        // Stopping a test replica need not wait for a load balancer: binary.rs tests the delay.
        ("TOKEN_PROXY_DRAIN_DELAY".into(), "0".into()),
    ]);
    for (name, value) in overrides {
        if is_secret_setting(name) {
            registry().secret((*name).to_owned(), value, |names| format!("the value of `{names}`"));
        }
        vars.insert((*name).to_owned(), (*value).to_owned());
    }
    Config::from_lookup(|name| vars.get(name).cloned()).expect("valid test config")
}

/// A running proxy replica. When it stops or is dropped, its metrics and the logs are scanned
/// for canaries.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    /// What `/metrics` renders, readable without the listener (which stops with the replica).
    registry: Arc<Metrics>,
    checked: bool,
}

impl TestProxy {
    pub async fn spawn(config: Config) -> TestProxy {
        capture();
        token_proxy::install_tls_provider();
        let app = Application::build(config).await.expect("proxy starts");
        let (addr, admin) = (app.client_addr(), app.admin_addr());
        let registry = Arc::clone(&app.state().metrics);
        // With Redis, a replica uses it once it has read the purge epochs (at start): wait
        // for that, so tests see the cluster behaviour from the first request (bounded: Redis
        // may be down on purpose).
        let service = app.state().service.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        let deadline = Instant::now() + Duration::from_secs(2);
        while !service.purges_synced() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        TestProxy { addr, admin, stop: Some(stop), task, registry, checked: false }
    }

    /// The leak checks of a stopping replica: its metrics, and everything logged so far.
    fn check_leaks(&mut self) {
        self.checked = true;
        check_no_leak(&format!("the metrics of the replica at {}", self.admin), self.registry.render().as_bytes());
        check_logs();
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/oauth2/token", self.addr)
    }

    /// Stops the replica and waits until it has drained.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        self.check_leaks();
    }

    pub async fn metrics(&self) -> String {
        let text = http().get(format!("http://{}/metrics", self.admin)).send().await.unwrap().text().await.unwrap();
        check_no_leak(&format!("the /metrics of the replica at {}", self.admin), text.as_bytes());
        text
    }

    /// The value of one metric line, e.g. `token_proxy_requests_total{outcome="hit"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Panicking in a drop that runs because of a panic would abort the whole run.
        if !self.checked && !std::thread::panicking() {
            self.check_leaks();
        }
    }
}

/// A proxy in front of a mock-idp, with or without Redis.
pub struct TestApp {
    pub idp: RunningMockIdp,
    pub proxy: TestProxy,
    pub redis: Option<RedisServer>,
}

impl TestApp {
    /// Embedded mode: no Redis.
    pub async fn embedded(clients: Vec<ClientConfig>, overrides: &[(&str, &str)]) -> TestApp {
        let idp = spawn_idp(clients).await;
        let proxy = TestProxy::spawn(proxy_config(&idp.token_url(), overrides)).await;
        TestApp { idp, proxy, redis: None }
    }

    /// With its own redis-server.
    pub async fn with_redis(clients: Vec<ClientConfig>, overrides: &[(&str, &str)]) -> TestApp {
        let redis = RedisServer::start().await;
        let idp = spawn_idp(clients).await;
        let url = redis.url();
        let mut all = vec![("TOKEN_PROXY_REDIS_URL", url.as_str()), ("TOKEN_PROXY_SECRET", ROOT_SECRET)];
        all.extend_from_slice(overrides);
        let proxy = TestProxy::spawn(proxy_config(&idp.token_url(), &all)).await;
        TestApp { idp, proxy, redis: Some(redis) }
    }

    pub fn redis(&self) -> &RedisServer {
        self.redis.as_ref().expect("this app has Redis")
    }

    pub fn redis_mut(&mut self) -> &mut RedisServer {
        self.redis.as_mut().expect("this app has Redis")
    }

    pub fn issued(&self) -> u64 {
        self.idp.idp.issued_total()
    }

    pub fn upstream_requests(&self) -> u64 {
        self.idp.idp.requests_total()
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

pub fn http() -> reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            token_proxy::install_tls_provider();
            // Idle pooled connections are dropped before a replica closes them (it closes idle
            // keep-alive connections after its header-read timeout, 5 s by default, the admin
            // listener too): reusing one just as the server closes it fails the request.
            reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_idle_timeout(Duration::from_millis(800))
                .build()
                .unwrap()
        })
        .clone()
}

/// A token endpoint answer, read whole.
#[derive(Debug)]
pub struct TokenReply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: serde_json::Value,
    pub raw: String,
}

impl TokenReply {
    pub fn x_cache(&self) -> &str {
        self.headers.get("x-cache").map(|v| v.to_str().unwrap()).unwrap_or("")
    }

    pub fn access_token(&self) -> &str {
        self.body["access_token"].as_str().unwrap_or_else(|| panic!("no token in {}", self.raw))
    }

    pub fn expires_in(&self) -> u64 {
        self.body["expires_in"].as_u64().unwrap_or_else(|| panic!("no expires_in in {}", self.raw))
    }

    pub fn error(&self) -> &str {
        self.body["error"].as_str().unwrap_or_else(|| panic!("no error in {}", self.raw))
    }
}

pub async fn read(response: reqwest::Response) -> TokenReply {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let raw = response.text().await.unwrap();
    let body = serde_json::from_str(&raw).unwrap_or(serde_json::Value::Null);
    let reply = TokenReply { status, headers, body, raw };
    check_reply(&reply);
    reply
}

/// client_secret_basic.
pub async fn post_basic(url: &str, id: &str, secret: &str, scope: Option<&str>) -> TokenReply {
    let mut body = "grant_type=client_credentials".to_owned();
    if let Some(scope) = scope {
        body.push_str("&scope=");
        shared::form::encode_component(scope, &mut body);
    }
    let response = http()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", shared::basic::encode(id, secret))
        .body(body)
        .send()
        .await
        .unwrap();
    read(response).await
}

/// client_secret_post.
pub async fn post_body(url: &str, id: &str, secret: &str, scope: Option<&str>) -> TokenReply {
    let mut pairs = vec![("grant_type", "client_credentials"), ("client_id", id), ("client_secret", secret)];
    if let Some(scope) = scope {
        pairs.push(("scope", scope));
    }
    post_form(url, &shared::form::encode_pairs(pairs)).await
}

/// A form body as given.
pub async fn post_form(url: &str, body: &str) -> TokenReply {
    let response = http()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.to_owned())
        .send()
        .await
        .unwrap();
    read(response).await
}

/// GETs a JSON document.
pub async fn get_json(url: &str) -> serde_json::Value {
    let text = http().get(url).send().await.unwrap().text().await.unwrap();
    check_no_leak(&format!("the answer to GET {url}"), text.as_bytes());
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

/// Waits until `condition` holds, polling; panics after `timeout`.
pub async fn eventually(timeout: Duration, what: &str, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Clusters: several replicas sharing one Redis and one secret.

/// `n` replicas in front of one mock-idp, sharing one redis-server. Each replica is a separate
/// app instance with its own connections, L1 and single-flight state.
pub struct TestCluster {
    pub redis: RedisServer,
    pub idp: RunningMockIdp,
    pub replicas: Vec<TestProxy>,
}

impl TestCluster {
    pub async fn start(n: usize, clients: Vec<ClientConfig>, overrides: &[(&str, &str)]) -> TestCluster {
        let redis = RedisServer::start().await;
        let idp = spawn_idp(clients).await;
        let mut replicas = Vec::new();
        for _ in 0..n {
            replicas.push(TestCluster::replica(&redis.url(), &idp, overrides).await);
        }
        TestCluster { redis, idp, replicas }
    }

    /// A replica of this cluster's configuration, against `redis_url` (e.g. a fault proxy).
    pub async fn replica(redis_url: &str, idp: &RunningMockIdp, overrides: &[(&str, &str)]) -> TestProxy {
        let mut all = vec![("TOKEN_PROXY_REDIS_URL", redis_url), ("TOKEN_PROXY_SECRET", ROOT_SECRET)];
        all.extend_from_slice(overrides);
        TestProxy::spawn(proxy_config(&idp.token_url(), &all)).await
    }

    /// Token URLs of the replicas, to spread requests over.
    pub fn urls(&self) -> Vec<String> {
        self.replicas.iter().map(TestProxy::token_url).collect()
    }

    /// Sum of one metric over all replicas.
    pub async fn metric_sum(&self, series: &str) -> f64 {
        let mut sum = 0.0;
        for replica in &self.replicas {
            sum += replica.metric(series).await;
        }
        sum
    }

    /// The Redis lock key the proxy uses for a Basic request of `id`/`secret` with `extra`.
    pub fn lock_key(&self, id: &str, secret: &str, extra: &[(&str, &str)]) -> String {
        use base64::Engine as _;
        use shared::canonical::{AuthMethod, CanonicalRequest, Scope};
        let root = base64::engine::general_purpose::STANDARD.decode(ROOT_SECRET).unwrap();
        let keys = shared::keys::Keys::derive(&root).unwrap();
        let request = CanonicalRequest {
            client_id: id.into(),
            client_secret: secret.into(),
            auth_method: AuthMethod::Basic,
            grant_type: "client_credentials".into(),
            scope: Scope::Omitted,
            extra: extra.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
        };
        // The purge-everything epoch is part of every key (see `token_proxy::purge`).
        let all = RespConnection::open(self.redis.port).unwrap().call(&[b"HGET", b"tp:purge", b"all"]).unwrap();
        let all = all.flatten().concat();
        let epochs = shared::canonical::PurgeEpochs {
            all: std::str::from_utf8(&all).unwrap().parse().unwrap_or(0),
            ..Default::default()
        };
        let key = keys.hasher.cache_key_with(&self.idp.token_url(), &request, epochs);
        format!("{}:lock", token_proxy::store::RedisStore::entry_key(&key))
    }
}

/// A Basic token request with extra form parameters.
pub async fn post_basic_with(url: &str, id: &str, secret: &str, extra: &[(&str, &str)]) -> TokenReply {
    let mut pairs = vec![("grant_type", "client_credentials")];
    pairs.extend_from_slice(extra);
    let response = http()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", shared::basic::encode(id, secret))
        .body(shared::form::encode_pairs(pairs))
        .send()
        .await
        .unwrap();
    read(response).await
}

/// Runs `count` copies of a request concurrently, spread round-robin over `urls`.
pub async fn burst(urls: &[String], count: usize, id: &str, secret: &str, extra: &[(&str, &str)]) -> Vec<TokenReply> {
    let handles: Vec<_> = (0..count)
        .map(|i| {
            let url = urls[i % urls.len()].clone();
            let (id, secret) = (id.to_owned(), secret.to_owned());
            let extra: Vec<(String, String)> = extra.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
            tokio::spawn(async move {
                let extra: Vec<(&str, &str)> = extra.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                post_basic_with(&url, &id, &secret, &extra).await
            })
        })
        .collect();
    let mut replies = Vec::with_capacity(count);
    for handle in handles {
        replies.push(handle.await.unwrap());
    }
    replies
}

/// What a stretch of steady load saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub requests: usize,
    /// Answers by status code.
    pub statuses: std::collections::BTreeMap<u16, usize>,
    /// Answers by X-Cache value.
    pub cache: std::collections::BTreeMap<String, usize>,
    pub slowest: Duration,
}

impl LoadReport {
    pub fn server_errors(&self) -> usize {
        self.statuses.iter().filter(|(s, _)| **s >= 500).map(|(_, n)| n).sum()
    }
}

/// Steady load for `duration`: `workers` loops, each sending requests for one of `keys` keys
/// (the `n` parameter of the form) to the replicas in turn, as fast as answers come.
pub async fn steady_load(
    urls: Vec<String>,
    duration: Duration,
    workers: usize,
    keys: usize,
    id: &str,
    secret: &str,
) -> LoadReport {
    let stop_at = Instant::now() + duration;
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let mut handles = Vec::new();
    for w in 0..workers {
        let (urls, report, id, secret) = (urls.clone(), Arc::clone(&report), id.to_owned(), secret.to_owned());
        handles.push(tokio::spawn(async move {
            let mut i = w;
            while Instant::now() < stop_at {
                let n = (i % keys).to_string();
                let started = Instant::now();
                let reply = post_basic_with(&urls[i % urls.len()], &id, &secret, &[("n", &n)]).await;
                let elapsed = started.elapsed();
                let mut r = report.lock().unwrap();
                r.requests += 1;
                *r.statuses.entry(reply.status).or_default() += 1;
                *r.cache.entry(reply.x_cache().to_owned()).or_default() += 1;
                r.slowest = r.slowest.max(elapsed);
                i += workers;
            }
        }));
    }
    for handle in handles {
        handle.await.unwrap();
    }
    Arc::try_unwrap(report).unwrap().into_inner().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Raw sockets

/// Reads until the peer closes the connection (EOF or reset), at most `limit`. Returns what was
/// received and how long it took, or `None` if the connection was still open at `limit`.
pub async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<(Vec<u8>, Duration)> {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.checked_sub(started.elapsed())?;
        match tokio::time::timeout(left, tokio::io::AsyncReadExt::read(stream, &mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some((received, started.elapsed())),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => return None,
        }
    }
}

/// Reads one whole response (head plus Content-Length body) and returns it as text.
pub async fn read_one_response(stream: &mut tokio::net::TcpStream) -> String {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok())?
                })
                .expect("a Content-Length");
            if received.len() >= end + 4 + length {
                return text;
            }
        }
        let left = deadline.checked_duration_since(Instant::now()).expect("a whole response within 5 s");
        let n = tokio::time::timeout(left, tokio::io::AsyncReadExt::read(stream, &mut buf))
            .await
            .expect("a response within 5 s")
            .unwrap();
        assert!(n > 0, "connection closed mid-response: {text}");
        received.extend_from_slice(&buf[..n]);
    }
}

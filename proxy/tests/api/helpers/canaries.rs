//! Canaries: the search for secret values in everything the proxy writes. Each value is looked
//! for in every form it could leak in ([`leak_forms`]); [`Canaries`] finds all forms of all
//! values at once, fast enough to scan everything the whole suite logs. What is registered, and
//! when the harness checks, is `leak_checks.rs`.

use std::collections::{BTreeSet, HashMap};

use base64::Engine as _;
use base64::engine::GeneralPurpose;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};

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
    pub(super) canaries: Vec<Canary>,
    /// (canary, form) of each needle.
    needles: Vec<(usize, usize)>,
    /// A window's bytes → (needle, offset of the window in the needle).
    keys: HashMap<u64, Vec<(usize, usize)>>,
    filter: Vec<u64>,
    pub(super) longest: usize,
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
    pub(super) fn check_after(
        &self,
        place: &str,
        haystack: &[u8],
        text: bool,
        fresh_from: usize,
    ) -> Result<(), String> {
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

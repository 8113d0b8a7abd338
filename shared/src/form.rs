//! Strict `application/x-www-form-urlencoded` parsing and encoding.
//!
//! OAuth 2.0 (RFC 6749 §3.2) says a parameter sent without a value is to be treated as if it
//! were omitted, and that no parameter may appear twice. A lenient parser (one that keeps the
//! last value, or decodes bad UTF-8 lossily) would let two different requests collapse into one
//! cache key, so this one refuses anything ambiguous: a repeated name (even with an empty
//! value), an empty name, a broken `%` escape or bytes that do not decode to UTF-8.

use std::fmt;

/// Most parameters a token request may carry. Real clients send at most five or six.
pub const MAX_PARAMETERS: usize = 32;

/// A parsed form: unique names, each with a non-empty value, in the order they were sent.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Form {
    pairs: Vec<(String, String)>,
}

/// Why a form body (or a form-encoded component) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormError {
    #[error("parameter `{0}` is repeated")]
    Repeated(String),
    #[error("a parameter has an empty name")]
    EmptyName,
    #[error("malformed percent-encoding")]
    BadPercentEncoding,
    #[error("parameters must be UTF-8")]
    NotUtf8,
    #[error("too many parameters (at most {MAX_PARAMETERS})")]
    TooManyParameters,
}

impl Form {
    /// Parses a request body. Empty values are dropped (they equal an absent parameter), but
    /// their names still count for the repetition check.
    pub fn parse(body: &[u8]) -> Result<Form, FormError> {
        let mut form = Form::default();
        // Names sent with an empty value: absent, but they still count as sent.
        let mut empty: Vec<String> = Vec::new();
        for segment in body.split(|&b| b == b'&').filter(|s| !s.is_empty()) {
            if form.pairs.len() + empty.len() == MAX_PARAMETERS {
                return Err(FormError::TooManyParameters);
            }
            let (raw_name, raw_value) = match segment.iter().position(|&b| b == b'=') {
                Some(i) => (&segment[..i], &segment[i + 1..]),
                None => (segment, &b""[..]),
            };
            let name = decode_component(raw_name)?;
            if name.is_empty() {
                return Err(FormError::EmptyName);
            }
            if empty.contains(&name) || form.pairs.iter().any(|(n, _)| *n == name) {
                return Err(FormError::Repeated(name));
            }
            let value = decode_component(raw_value)?;
            if value.is_empty() {
                empty.push(name);
            } else {
                form.pairs.push((name, value));
            }
        }
        Ok(form)
    }

    /// The value of `name`, or `None` when it was absent or empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Removes and returns the value of `name`.
    pub fn take(&mut self, name: &str) -> Option<String> {
        let index = self.pairs.iter().position(|(n, _)| n == name)?;
        Some(self.pairs.remove(index).1)
    }

    /// Adds a parameter; fails if the name is already present.
    pub fn insert(&mut self, name: String, value: String) -> Result<(), FormError> {
        if self.get(&name).is_some() {
            return Err(FormError::Repeated(name));
        }
        if !value.is_empty() {
            self.pairs.push((name, value));
        }
        Ok(())
    }

    /// The parameters, in the order they were sent.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Consumes the form, returning its parameters in order.
    pub fn into_pairs(self) -> Vec<(String, String)> {
        self.pairs
    }
}

/// Values may be secrets: show names only.
impl fmt::Debug for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.pairs.iter().map(|(n, _)| n)).finish()
    }
}

/// Decodes one form-encoded component: `+` is a space, `%XX` a byte, and the result must be UTF-8.
pub fn decode_component(raw: &[u8]) -> Result<String, FormError> {
    if !raw.iter().any(|&b| b == b'+' || b == b'%') {
        // Nothing to decode (the common case): one copy and a UTF-8 check.
        return String::from_utf8(raw.to_vec()).map_err(|_| FormError::NotUtf8);
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = raw.get(i + 1).and_then(|&b| hex_value(b));
                let lo = raw.get(i + 2).and_then(|&b| hex_value(b));
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push(hi << 4 | lo),
                    _ => return Err(FormError::BadPercentEncoding),
                }
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| FormError::NotUtf8)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends `value` form-encoded (WHATWG `application/x-www-form-urlencoded` byte serializer).
pub fn encode_component(value: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value.as_bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => out.push(b as char),
            b' ' => out.push('+'),
            _ => {
                out.push('%');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 0xf)] as char);
            }
        }
    }
}

/// Encodes name/value pairs as a form body.
pub fn encode_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (name, value) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        encode_component(name, &mut out);
        out.push('=');
        encode_component(value, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_a_token_request() {
        let form = Form::parse(b"grant_type=client_credentials&scope=a%2Fb+c&client_id=x").unwrap();
        assert_eq!(form.get("grant_type"), Some("client_credentials"));
        assert_eq!(form.get("scope"), Some("a/b c"));
        assert_eq!(form.get("client_id"), Some("x"));
        assert_eq!(form.len(), 3);
    }

    #[test]
    fn empty_values_are_absent() {
        let form = Form::parse(b"scope=&grant_type=client_credentials&flag").unwrap();
        assert_eq!(form.get("scope"), None);
        assert_eq!(form.get("flag"), None);
        assert_eq!(form.len(), 1);
    }

    #[test]
    fn repeated_names_are_refused_even_when_one_is_empty() {
        assert_eq!(Form::parse(b"a=1&a=2"), Err(FormError::Repeated("a".into())));
        assert_eq!(Form::parse(b"a=&a=2"), Err(FormError::Repeated("a".into())));
        // `%61` is `a`: encoding does not hide a repetition.
        assert_eq!(Form::parse(b"a=1&%61=2"), Err(FormError::Repeated("a".into())));
    }

    #[test]
    fn refuses_broken_input() {
        assert_eq!(Form::parse(b"=x"), Err(FormError::EmptyName));
        assert_eq!(Form::parse(b"a=%4"), Err(FormError::BadPercentEncoding));
        assert_eq!(Form::parse(b"a=%zz"), Err(FormError::BadPercentEncoding));
        assert_eq!(Form::parse(b"a=%ff"), Err(FormError::NotUtf8));
        let many: Vec<String> = (0..=MAX_PARAMETERS).map(|i| format!("p{i}=1")).collect();
        assert_eq!(Form::parse(many.join("&").as_bytes()), Err(FormError::TooManyParameters));
    }

    #[test]
    fn debug_never_shows_values() {
        let form = Form::parse(b"client_secret=hunter2").unwrap();
        assert!(!format!("{form:?}").contains("hunter2"));
    }

    proptest! {
        #[test]
        fn encode_then_parse_round_trips(
            pairs in proptest::collection::btree_map("[^\\x00]{1,12}", "\\PC{1,24}", 0..8)
        ) {
            let body = encode_pairs(pairs.iter().map(|(n, v)| (n.as_str(), v.as_str())));
            let form = Form::parse(body.as_bytes()).unwrap();
            prop_assert_eq!(form.len(), pairs.len());
            for (name, value) in &pairs {
                prop_assert_eq!(form.get(name), Some(value.as_str()));
            }
        }

        #[test]
        fn parse_never_panics(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = Form::parse(&body);
        }

        #[test]
        fn component_round_trips(value in "\\PC*") {
            let mut encoded = String::new();
            encode_component(&value, &mut encoded);
            prop_assert_eq!(decode_component(encoded.as_bytes()).unwrap(), value);
        }
    }
}

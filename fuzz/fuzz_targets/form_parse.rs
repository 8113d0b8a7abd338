//! `shared::form::Form::parse` on arbitrary bytes (docs/architecture.md, invariant 7).
//!
//! Properties: never panics; an accepted form has unique, non-empty names and non-empty values,
//! at most `MAX_PARAMETERS` of them; re-encoding the pairs with `encode_pairs` and parsing again
//! yields the same pairs in the same order, and that encoding is a fixed point. Any UTF-8 input
//! also round-trips through `encode_component` / `decode_component`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::form::{Form, MAX_PARAMETERS, decode_component, encode_component, encode_pairs};

fuzz_target!(|data: &[u8]| {
    if let Ok(form) = Form::parse(data) {
        let pairs = form.clone().into_pairs();
        assert!(pairs.len() <= MAX_PARAMETERS);
        for (i, (name, value)) in pairs.iter().enumerate() {
            assert!(!name.is_empty() && !value.is_empty());
            assert!(pairs[..i].iter().all(|(n, _)| n != name), "repeated name accepted");
            assert_eq!(form.get(name), Some(value.as_str()));
        }

        let encoded = encode_pairs(form.iter());
        let again = Form::parse(encoded.as_bytes()).expect("a re-encoded form parses");
        assert_eq!(again.clone().into_pairs(), pairs, "encode_pairs then parse changed the pairs");
        assert_eq!(encode_pairs(again.iter()), encoded, "encoding is not canonical");
    }

    if let Ok(text) = std::str::from_utf8(data) {
        let mut encoded = String::new();
        encode_component(text, &mut encoded);
        assert!(!encoded.contains(['&', '=']), "an encoded component contains a delimiter");
        assert_eq!(decode_component(encoded.as_bytes()).as_deref(), Ok(text));
    }
});

//! HTTP Basic client authentication as RFC 6749 §2.3.1 defines it: the client id and secret are
//! each form-urlencoded, joined with `:`, then base64-encoded. So a secret may contain `:`, `+`
//! or `%`, and the first `:` after decoding base64 is always the separator.

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use secrecy::SecretString;

use crate::form::{decode_component, encode_component};

/// Standard alphabet; padding optional on input (some clients strip it), always written.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Credentials from an `Authorization: Basic` header.
#[derive(Debug)]
pub struct BasicCredentials {
    pub client_id: String,
    /// `None` when the secret part is empty (an empty value equals an absent one).
    pub client_secret: Option<SecretString>,
}

/// Why an `Authorization` header could not be read as Basic credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BasicError {
    #[error("the Authorization scheme is not Basic")]
    NotBasic,
    #[error("Basic credentials are not valid base64")]
    BadBase64,
    #[error("Basic credentials lack the `:` separator")]
    NoSeparator,
    #[error("Basic credentials are not form-urlencoded UTF-8")]
    BadEncoding,
    #[error("Basic credentials have an empty client id")]
    EmptyClientId,
}

/// Decodes a whole `Authorization` header value such as `Basic Y2xpZW50OnNlY3JldA==`.
/// The scheme name is case-insensitive (RFC 9110 §11.1).
pub fn decode(header_value: &str) -> Result<BasicCredentials, BasicError> {
    let (scheme, rest) = header_value.split_once(' ').ok_or(BasicError::NotBasic)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(BasicError::NotBasic);
    }
    let decoded = BASE64.decode(rest.trim_start_matches(' ')).map_err(|_| BasicError::BadBase64)?;
    let colon = decoded.iter().position(|&b| b == b':').ok_or(BasicError::NoSeparator)?;
    let client_id = decode_component(&decoded[..colon]).map_err(|_| BasicError::BadEncoding)?;
    let secret = decode_component(&decoded[colon + 1..]).map_err(|_| BasicError::BadEncoding)?;
    if client_id.is_empty() {
        return Err(BasicError::EmptyClientId);
    }
    Ok(BasicCredentials { client_id, client_secret: (!secret.is_empty()).then(|| SecretString::from(secret)) })
}

/// Encodes credentials into a whole `Authorization` header value.
pub fn encode(client_id: &str, client_secret: &str) -> String {
    let mut joined = String::with_capacity(client_id.len() + client_secret.len() + 1);
    encode_component(client_id, &mut joined);
    joined.push(':');
    encode_component(client_secret, &mut joined);
    format!("Basic {}", BASE64.encode(joined))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use secrecy::ExposeSecret;

    #[test]
    fn decodes_the_rfc_example() {
        // RFC 6749 §2.3.1: "Authorization: Basic czZCaGRSa3F0Mzo3RmpmcDBaQnIxS3REUmJuZlZkbUl3"
        let creds = decode("Basic czZCaGRSa3F0Mzo3RmpmcDBaQnIxS3REUmJuZlZkbUl3").unwrap();
        assert_eq!(creds.client_id, "s6BhdRkqt3");
        assert_eq!(creds.client_secret.unwrap().expose_secret(), "7Fjfp0ZBr1KtDRbnfVdmIw");
    }

    #[test]
    fn secret_may_contain_separator_and_escapes() {
        let header = encode("my client", "a:b+c%d");
        let creds = decode(&header).unwrap();
        assert_eq!(creds.client_id, "my client");
        assert_eq!(creds.client_secret.unwrap().expose_secret(), "a:b+c%d");
    }

    #[test]
    fn scheme_is_case_insensitive_and_padding_optional() {
        let creds = decode("bAsIc YTpi").unwrap();
        assert_eq!(creds.client_id, "a");
        let creds = decode("Basic YTpiYw").unwrap();
        assert_eq!(creds.client_secret.unwrap().expose_secret(), "bc");
    }

    #[test]
    fn refuses_malformed_headers() {
        assert_eq!(decode("Bearer abc").unwrap_err(), BasicError::NotBasic);
        assert_eq!(decode("Basic").unwrap_err(), BasicError::NotBasic);
        assert_eq!(decode("Basic !!!").unwrap_err(), BasicError::BadBase64);
        assert_eq!(decode("Basic YWJj").unwrap_err(), BasicError::NoSeparator);
        assert_eq!(decode("Basic OnNlY3JldA==").unwrap_err(), BasicError::EmptyClientId);
        // "a:%zz"
        assert_eq!(decode("Basic YTolenp6").unwrap_err(), BasicError::BadEncoding);
    }

    #[test]
    fn empty_secret_is_absent() {
        assert!(decode("Basic YTo=").unwrap().client_secret.is_none());
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(id in "\\PC{1,40}", secret in "\\PC{1,80}") {
            let creds = decode(&encode(&id, &secret)).unwrap();
            prop_assert_eq!(creds.client_id, id);
            let decoded_secret = creds.client_secret.unwrap();
            prop_assert_eq!(decoded_secret.expose_secret(), secret.as_str());
        }

        #[test]
        fn decode_never_panics(header in "\\PC{0,120}") {
            let _ = decode(&header);
        }
    }
}

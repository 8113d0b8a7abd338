//! The root secret the cache keys and seal keys derive from, and the earlier ones still read.

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretBox};
use shared::keys::{Keys, MIN_ROOT_SECRET_LEN};

use super::{ConfigError, Setting, Source};

pub static SECRET: Setting = Setting {
    name: "TOKEN_PROXY_SECRET",
    default: None,
    help: "root secret, base64, at least 32 bytes; required with Redis, random per process without",
};
pub static SECRET_FILE: Setting =
    Setting { name: "TOKEN_PROXY_SECRET_FILE", default: None, help: "file holding TOKEN_PROXY_SECRET" };
pub static PREVIOUS_SECRETS: Setting = Setting {
    name: "TOKEN_PROXY_PREVIOUS_SECRETS",
    default: None,
    help: "earlier root secrets, base64, comma-separated: their entries are still read (key rotation)",
};
pub static PREVIOUS_SECRETS_FILE: Setting = Setting {
    name: "TOKEN_PROXY_PREVIOUS_SECRETS_FILE",
    default: None,
    help: "file holding TOKEN_PROXY_PREVIOUS_SECRETS, one per line",
};

/// Root secrets, inline or each from a file.
#[derive(Debug)]
pub struct SecretSettings {
    /// The current root secret; `None` = random per process (only without Redis).
    pub current: Option<SecretBox<Vec<u8>>>,
    /// Earlier root secrets whose entries are still read (never written).
    pub previous: Vec<SecretBox<Vec<u8>>>,
}

impl SecretSettings {
    pub(super) fn parse(source: &Source) -> Result<SecretSettings, ConfigError> {
        let current = match inline_or_file(source, &SECRET, &SECRET_FILE)? {
            Some((setting, encoded)) => {
                Some(decode_root_secret(&encoded).map_err(|message| source.error(setting, message))?)
            }
            None => None,
        };
        let previous = match inline_or_file(source, &PREVIOUS_SECRETS, &PREVIOUS_SECRETS_FILE)? {
            Some((setting, list)) => list
                .split([',', '\n'])
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .enumerate()
                .map(|(i, encoded)| {
                    decode_root_secret(encoded)
                        .map_err(|message| source.error(setting, format!("secret {}: {message}", i + 1)))
                })
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        if !previous.is_empty() && current.is_none() {
            return Err(source.error(&PREVIOUS_SECRETS, format!("needs {} (the current secret)", SECRET.name)));
        }
        Ok(SecretSettings { current, previous })
    }

    /// The current keys (random without a secret) and those of the earlier secrets.
    pub fn keys(&self) -> Result<(Keys, Vec<Keys>), ConfigError> {
        let derive =
            |secret: &SecretBox<Vec<u8>>| Keys::derive(secret.expose_secret()).map_err(|e| SECRET.error(e.to_string()));
        let current = match &self.current {
            Some(secret) => derive(secret)?,
            None => Keys::random(),
        };
        let previous = self.previous.iter().map(derive).collect::<Result<_, _>>()?;
        Ok((current, previous))
    }
}

/// A secret given inline (`NAME`) or in a file (`NAME_FILE`), trimmed, with the setting it
/// came from (for error messages, which never echo the value).
pub(super) fn inline_or_file(
    source: &Source,
    inline: &'static Setting,
    file: &'static Setting,
) -> Result<Option<(&'static Setting, String)>, ConfigError> {
    match (source.get(inline), source.get(file)) {
        (Some(_), Some(_)) => Err(source.error(file, format!("set either {} or {}, not both", inline.name, file.name))),
        (Some(value), None) => Ok(Some((inline, value.trim().to_owned()))),
        (None, Some(path)) => {
            let contents =
                std::fs::read_to_string(&path).map_err(|e| source.error(file, format!("cannot read {path}: {e}")))?;
            Ok(Some((file, contents.trim().to_owned())))
        }
        (None, None) => Ok(None),
    }
}

/// Base64 of at least [`MIN_ROOT_SECRET_LEN`] bytes. The message never quotes the value.
fn decode_root_secret(encoded: &str) -> Result<SecretBox<Vec<u8>>, String> {
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|_| "is not valid base64".to_owned())?;
    if bytes.len() < MIN_ROOT_SECRET_LEN {
        return Err(format!(
            "must decode to at least {MIN_ROOT_SECRET_LEN} bytes, got {} (try: openssl rand -base64 32)",
            bytes.len()
        ));
    }
    Ok(SecretBox::new(Box::new(bytes)))
}

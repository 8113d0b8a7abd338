//! The admin API (`POST /admin/purge`) and its bearer token.

use secrecy::{ExposeSecret, SecretString};

use super::secrets::inline_or_file;
use super::{ConfigError, Setting, Source};

pub static ADMIN_TOKEN: Setting = Setting {
    name: "TOKEN_PROXY_ADMIN_TOKEN",
    default: None,
    help: "bearer token of the admin API (POST /admin/purge); unset = admin API off",
};
pub static ADMIN_TOKEN_FILE: Setting =
    Setting { name: "TOKEN_PROXY_ADMIN_TOKEN_FILE", default: None, help: "file holding TOKEN_PROXY_ADMIN_TOKEN" };

/// Shortest admin token accepted: it guards purges of the whole cache.
const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// The admin API.
#[derive(Debug)]
pub struct AdminSettings {
    /// Bearer token of the admin API; `None` turns the admin API off.
    pub token: Option<SecretString>,
}

impl AdminSettings {
    pub(super) fn parse(source: &Source) -> Result<AdminSettings, ConfigError> {
        let Some((setting, token)) = inline_or_file(source, &ADMIN_TOKEN, &ADMIN_TOKEN_FILE)? else {
            return Ok(AdminSettings { token: None });
        };
        if token.len() < MIN_ADMIN_TOKEN_LEN {
            return Err(source.error(setting, format!("must be at least {MIN_ADMIN_TOKEN_LEN} characters")));
        }
        Ok(AdminSettings { token: Some(SecretString::from(token)) })
    }

    /// SHA-256 of the token, all the admin API keeps of it; `None` = admin API off.
    pub fn token_digest(&self) -> Option<[u8; 32]> {
        self.token.as_ref().map(|t| crate::admin::digest(t.expose_secret()))
    }
}

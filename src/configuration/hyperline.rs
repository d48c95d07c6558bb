//! `[hyperline]`: where the API is, how to reach it, and the key.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::pem::Pem;
use super::secret::ApiKey;
use super::{ConfigError, invalid};

/// `[hyperline]`.
#[derive(Clone, Debug, Deserialize)]
pub struct HyperlineSettings {
    /// API root, without the `/v1/...` path.
    pub base_url: Url,
    /// The key, from `api_key` or read from `api_key_file` at load time.
    pub api_key: Option<ApiKey>,
    /// A file holding the key (Kubernetes secret).
    pub api_key_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) for `https://`, read at load.
    pub ca_file: Option<Pem>,
    /// Total deadline of one request.
    pub timeout_secs: u64,
    /// Deadline of the connect phase.
    pub connect_timeout_secs: u64,
    /// Client-side cap per replica; 0 = none.
    pub max_requests_per_second: u32,
    /// Accept a non-loopback `http://` base URL.
    pub allow_insecure_http: bool,
    /// Hyperline's idempotency window, in seconds: 24 h as documented. Only
    /// lowered, to watch in a test what happens when it passes.
    pub idempotency_window_secs: u64,
    /// Before failing a command whose idempotency window closed, read the
    /// customer's credit transactions: not charged, it is purchased as new;
    /// charged once, it succeeds (`"reconciled": true`). Off by default.
    pub reconcile_at_window: bool,
}

impl HyperlineSettings {
    /// Applies the rules of `[hyperline]` and reads `ca_file`.
    pub(super) fn validate(&mut self) -> Result<(), ConfigError> {
        match self.base_url.scheme() {
            "https" => {}
            "http" => {
                let loopback = match self.base_url.host() {
                    Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                    Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                    Some(url::Host::Domain(d)) => d == "localhost",
                    None => false,
                };
                if !loopback && !self.allow_insecure_http {
                    return Err(invalid(
                        "hyperline.base_url",
                        "uses http:// on a non-loopback host: the API key would travel in clear \
                         (use https://, or set hyperline.allow_insecure_http)",
                    ));
                }
            }
            other => {
                return Err(invalid(
                    "hyperline.base_url",
                    format!("has scheme `{other}`: use https://"),
                ));
            }
        }
        if self.base_url.query().is_some() || self.base_url.fragment().is_some() {
            return Err(invalid(
                "hyperline.base_url",
                "must not carry a query or fragment",
            ));
        }
        if self.timeout_secs == 0 {
            return Err(invalid("hyperline.timeout_secs", "must be positive"));
        }
        if self.connect_timeout_secs == 0 {
            return Err(invalid(
                "hyperline.connect_timeout_secs",
                "must be positive",
            ));
        }
        Pem::load(&mut self.ca_file, "hyperline.ca_file")
    }

    /// Reads `api_key_file` into `api_key`, refusing both set or an empty
    /// key (which Hyperline would answer with a 401 on every command).
    pub(super) fn read_api_key_file(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.api_key_file {
            if self.api_key.is_some() {
                return Err(invalid(
                    "hyperline.api_key_file",
                    "is set together with hyperline.api_key: set only one",
                ));
            }
            let key = std::fs::read_to_string(path).map_err(|e| {
                invalid(
                    "hyperline.api_key_file",
                    format!("cannot be read ({}): {e}", path.display()),
                )
            })?;
            self.api_key = Some(ApiKey::new(key));
        }
        if self.api_key.as_ref().is_some_and(|k| k.expose().is_empty()) {
            return Err(invalid("hyperline.api_key", "is empty"));
        }
        Ok(())
    }

    /// Total deadline of one request.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }

    /// Deadline of the connect phase.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{load, refused};
    use super::*;

    #[test]
    fn plain_http_only_on_loopback_unless_allowed() {
        for url in [
            "http://127.0.0.1:8089",
            "http://localhost:8089",
            "http://[::1]:8089",
        ] {
            assert!(load(&[("CPW__HYPERLINE__BASE_URL", url)]).is_ok(), "{url}");
        }
        refused(
            &[("CPW__HYPERLINE__BASE_URL", "http://api.hyperline.co")],
            "hyperline.base_url",
        );
        let allowed = load(&[
            ("CPW__HYPERLINE__BASE_URL", "http://sim.internal:8089"),
            ("CPW__HYPERLINE__ALLOW_INSECURE_HTTP", "true"),
        ]);
        assert!(allowed.is_ok());
    }

    #[test]
    fn the_key_can_come_from_a_file_but_not_from_both() {
        let path = std::env::temp_dir().join(format!("cpw-key-{}", uuid::Uuid::new_v4()));
        std::fs::write(&path, "file_key_456\n").expect("write");
        let p = path.to_string_lossy().to_string();
        let s = load(&[("CPW__HYPERLINE__API_KEY_FILE", &p)]).expect("valid");
        assert_eq!(
            s.require_api_key().map(ApiKey::expose).ok(),
            Some("file_key_456")
        );
        refused(
            &[
                ("CPW__HYPERLINE__API_KEY_FILE", &p),
                ("CPW__HYPERLINE__API_KEY", "k"),
            ],
            "hyperline.api_key_file",
        );
        refused(
            &[("CPW__HYPERLINE__API_KEY_FILE", "/nonexistent/key")],
            "hyperline.api_key_file",
        );
    }
}

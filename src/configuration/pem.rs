//! CA certificate files, read once when the settings load.
//!
//! Read at every connect, a CA file deleted or rotated into garbage after
//! start would turn into a broker or Hyperline outage at the next reconnect,
//! far from the change that caused it. Read at load, a bad file stops the
//! start with the key named, and a running replica keeps the certificates it
//! started with.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, invalid};

/// A PEM file of CA certificates (`amqp.ca_file`, `hyperline.ca_file`): its
/// path as configured and, once [`Settings`](super::Settings) has loaded,
/// its contents. `Debug` prints the path and the size only.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(from = "PathBuf")]
pub struct Pem {
    path: PathBuf,
    text: String,
}

impl From<PathBuf> for Pem {
    fn from(path: PathBuf) -> Self {
        Pem {
            path,
            text: String::new(),
        }
    }
}

impl Pem {
    /// Reads the file `key` names; a missing, unreadable or empty one stops
    /// the start here rather than at the first TLS handshake.
    fn read(key: &'static str, path: &Path) -> Result<Pem, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(key, format!("cannot be read ({}): {e}", path.display())))?;
        if !text.contains("-----BEGIN CERTIFICATE-----") {
            return Err(invalid(
                key,
                format!("({}) holds no PEM certificate", path.display()),
            ));
        }
        Ok(Pem {
            path: path.to_owned(),
            text,
        })
    }

    /// Replaces the path deserialized from `key` by the file's contents.
    pub(super) fn load(slot: &mut Option<Pem>, key: &'static str) -> Result<(), ConfigError> {
        if let Some(pem) = slot.take() {
            *slot = Some(Pem::read(key, &pem.path)?);
        }
        Ok(())
    }

    /// The file the certificates came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The certificates, as PEM text.
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pem")
            .field("path", &self.path)
            .field("bytes", &self.text.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{load, refused};

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    #[test]
    fn ca_files_are_read_at_load_and_debug_shows_only_path_and_size() {
        let dir = std::env::temp_dir().join(format!("cpw-pem-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("ca.pem");
        std::fs::write(&file, CA).expect("write");
        let path = file.to_string_lossy().into_owned();
        let s = load(&[
            ("CPW__AMQP__CA_FILE", path.as_str()),
            ("CPW__HYPERLINE__CA_FILE", path.as_str()),
        ])
        .expect("valid");
        std::fs::remove_file(&file).expect("remove");
        for pem in [&s.amqp.ca_file, &s.hyperline.ca_file] {
            let pem = pem.as_ref().expect("loaded");
            assert_eq!(pem.text(), CA, "kept after the file is gone");
            assert_eq!(pem.path(), file);
            let debug = format!("{pem:?}");
            assert!(!debug.contains("BEGIN"), "{debug}");
            assert!(debug.contains(&format!("bytes: {}", CA.len())), "{debug}");
        }
        refused(&[("CPW__AMQP__CA_FILE", path.as_str())], "amqp.ca_file");
        refused(
            &[("CPW__HYPERLINE__CA_FILE", path.as_str())],
            "hyperline.ca_file",
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

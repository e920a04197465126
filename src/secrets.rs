//! Secrets at rest: the cluster's age identity, and sealing / opening of the secrets the
//! replicated state must hold (certificate private keys).
//!
//! Architecture invariant: a secret is sealed by the admin API before its change is proposed, so
//! the Raft log, the state, snapshots and exports only ever hold age ciphertext. Only the gateway
//! opens them, in memory, when it compiles its TLS table.
//!
//! Every node of a cluster needs the same identity (`[secrets] identity_file`); a single node
//! creates one in its data directory on first start. The file is a standard age identity, so
//! `age -d -i <file>` opens a sealed value offline.

use age::secrecy::ExposeSecret;
use anyhow::Context;
use std::path::Path;

/// The first line of an armored age ciphertext.
pub const ARMOR_BEGIN: &str = "-----BEGIN AGE ENCRYPTED FILE-----";

/// Seals and opens secrets with the cluster's X25519 age identity.
pub struct Sealer {
    identity: age::x25519::Identity,
    recipient: age::x25519::Recipient,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("recipient", &self.recipient.to_string())
            .finish()
    }
}

impl Sealer {
    /// Reads the identity at `path`, or creates it (mode 0600) when `create` is true and the
    /// file does not exist.
    pub fn load_or_create(path: &Path, create: bool) -> anyhow::Result<Sealer> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let identity = age::x25519::Identity::generate();
                let body = format!(
                    "# apim secrets identity: seals certificate keys in the replicated state.\n\
                     # Every node of the cluster needs this same file. Back it up apart from the data.\n\
                     # public key: {}\n{}\n",
                    identity.to_public(),
                    identity.to_string().expose_secret()
                );
                crate::pki::write_private(path, body.as_bytes())?;
                body
            }
            Err(e) => {
                return Err(anyhow::anyhow!(
                    "cannot read the secrets identity {}: {e}",
                    path.display()
                ))
            }
        };
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .with_context(|| format!("{}: no age identity in the file", path.display()))?;
        let identity: age::x25519::Identity = line.parse().map_err(|_| {
            anyhow::anyhow!(
                "{}: not an age X25519 identity (expected AGE-SECRET-KEY-1...)",
                path.display()
            )
        })?;
        let recipient = identity.to_public();
        Ok(Sealer {
            identity,
            recipient,
        })
    }

    /// The public half, which anyone may use to seal a value for this cluster (`age -r`).
    pub fn recipient(&self) -> String {
        self.recipient.to_string()
    }

    /// Seals `plain` into an armored age ciphertext.
    pub fn seal(&self, plain: &[u8]) -> anyhow::Result<String> {
        age::encrypt_and_armor(&self.recipient, plain).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Opens an armored (or binary) age ciphertext sealed for this cluster.
    pub fn open(&self, sealed: &str) -> anyhow::Result<Vec<u8>> {
        age::decrypt(&self.identity, sealed.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Seals a tenant's secret: the plaintext names the tenant, so the ciphertext cannot be
    /// moved to another tenant's object.
    pub fn seal_for(&self, tenant: &str, plain: &[u8]) -> anyhow::Result<String> {
        let mut bound = format!("{BOUND_PREFIX}{tenant}\n").into_bytes();
        bound.extend_from_slice(plain);
        self.seal(&bound)
    }

    /// Opens a tenant's secret. A value sealed by apim for another tenant is refused; a value
    /// sealed outside apim (`age -r <recipient>`) carries no tenant and is accepted.
    pub fn open_for(&self, tenant: &str, sealed: &str) -> Result<Vec<u8>, OpenError> {
        let plain = self.open(sealed).map_err(|_| OpenError::Unreadable)?;
        let Some(rest) = plain.strip_prefix(BOUND_PREFIX.as_bytes()) else {
            return Ok(plain);
        };
        let Some(nl) = rest.iter().position(|b| *b == b'\n') else {
            return Err(OpenError::Unreadable);
        };
        if &rest[..nl] != tenant.as_bytes() {
            return Err(OpenError::OtherTenant);
        }
        Ok(rest[nl + 1..].to_vec())
    }
}

/// First line of a secret apim sealed for a tenant.
const BOUND_PREFIX: &str = "apim-sealed/v1 tenant=";

/// Why a tenant's secret cannot be opened.
#[derive(Debug, PartialEq, Eq)]
pub enum OpenError {
    /// Not age ciphertext for this cluster's identity.
    Unreadable,
    /// Sealed by apim for another tenant.
    OtherTenant,
}

impl Sealer {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_and_keeps_the_identity() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.age");
        assert!(Sealer::load_or_create(&path, false).is_err());
        let s = Sealer::load_or_create(&path, true).unwrap();
        let sealed = s.seal(b"private").unwrap();
        assert!(sealed.starts_with(ARMOR_BEGIN));
        assert!(!sealed.contains("private"));
        // the same file opens what it sealed, after a restart
        let again = Sealer::load_or_create(&path, true).unwrap();
        assert_eq!(again.recipient(), s.recipient());
        assert_eq!(again.open(&sealed).unwrap(), b"private");
        // another identity cannot
        let other = Sealer::load_or_create(&dir.path().join("other.age"), true).unwrap();
        assert!(other.open(&sealed).is_err());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "# nothing\nAGE-SECRET-KEY-1BAD\n").unwrap();
        let err = Sealer::load_or_create(&path, true).unwrap_err().to_string();
        assert!(err.contains("not an age X25519 identity"), "{err}");
    }

    #[test]
    fn tenant_secrets_stay_with_their_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sealer::load_or_create(&dir.path().join("id"), true).unwrap();
        let sealed = s.seal_for("bank-a", b"key").unwrap();
        assert_eq!(s.open_for("bank-a", &sealed).unwrap(), b"key");
        assert_eq!(s.open_for("bank-b", &sealed), Err(OpenError::OtherTenant));
        // sealed outside apim: no tenant in it
        let external = s.seal(b"key").unwrap();
        assert_eq!(s.open_for("bank-b", &external).unwrap(), b"key");
        assert_eq!(s.open_for("bank-a", "garbage"), Err(OpenError::Unreadable));
    }
}

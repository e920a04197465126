//! Internal PKI and randomness: the node's certificate authority (created on first start), the
//! certificates it issues, the TLS server configuration, and secure random tokens and ids.
//!
//! Architecture invariant: this is the one place that selects the crypto provider (aws-lc-rs)
//! for rustls and rcgen, and that creates TLS keys and bearer secrets. (The audit module makes
//! its own Ed25519 signing key, with aws-lc-rs too, so that the audit format depends on nothing
//! else of the crate.)

use anyhow::{anyhow, Context as _};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Installs aws-lc-rs as the process-wide provider of rustls and of jsonwebtoken. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
}

/// `N` bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> anyhow::Result<[u8; N]> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| anyhow!("the system random generator failed"))?;
    Ok(b)
}

/// A bearer secret: `prefix` + 43 characters of base64url (256 bits).
pub fn random_secret(prefix: &str) -> anyhow::Result<String> {
    let b = random_bytes::<32>()?;
    Ok(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    ))
}

/// A short random identifier: `prefix` + 16 hex characters.
pub fn random_id(prefix: &str) -> anyhow::Result<String> {
    Ok(format!("{prefix}{}", hex::encode(random_bytes::<8>()?)))
}

/// Hex SHA-256 of a secret: what the store keeps of API keys and tokens. Secrets are 256-bit
/// random values, so a plain hash (no salt, no stretching) cannot be reversed.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(secret_digest(secret))
}

/// The SHA-256 digest [`secret_hash`] writes in hex (the gateway looks API keys up by it).
pub fn secret_digest(secret: &str) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The digest a [`secret_hash`] spells (64 lower-case hex digits), or `None`.
pub fn secret_hash_digest(hash: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    // (`hex` reads capitals too, which `secret_hash` never writes)
    let lower = !hash.bytes().any(|c| c.is_ascii_uppercase());
    (lower && hex::decode_to_slice(hash, &mut out).is_ok()).then_some(out)
}

/// Creates a directory (and its parents) readable by the owner only.
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Writes `data` to `path` with `mode`, atomically (temporary file, fsync, rename, fsync of the
/// directory): after a crash the file is either the old one or the new one, never partial.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    // One temporary name per target (`ca.key.tmp`, not `ca.tmp`), created fresh: a stale one
    // left by a crash is removed, so its permissions never carry over to a secret.
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot remove {}", tmp.display())),
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(data)?;
    f.sync_all()?;
    drop(f);
    rename_durable(&tmp, path)
}

/// Renames `from` to `to` and fsyncs the directory, so the rename survives a power cut.
pub fn rename_durable(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::rename(from, to)
        .with_context(|| format!("cannot rename {} to {}", from.display(), to.display()))?;
    if let Some(dir) = to.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
    }
    Ok(())
}

/// [`write_atomic`] with mode 0600, for secrets.
pub fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    write_atomic(path, data, 0o600)
}

/// The node's internal CA, in `<data-dir>/pki/`.
pub struct Ca {
    pub cert_pem: String,
    pub cert_path: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Loads the CA from `dir`, creating it on first start.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Ca> {
        create_private_dir(dir)?;
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        if !cert_path.exists() {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::OrganizationName, "apim");
            dn.push(DnType::CommonName, "apim internal CA");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::hours(1);
            params.not_after = now + time::Duration::days(3650);
            let cert = params.self_signed(&key)?;
            write_private(&key_path, key.serialize_pem().as_bytes())?;
            write_atomic(&cert_path, cert.pem().as_bytes(), 0o644)?;
            tracing::info!(path = %cert_path.display(), "internal CA created");
        }
        let cert_pem = std::fs::read_to_string(&cert_path)
            .with_context(|| format!("cannot read {}", cert_path.display()))?;
        let key_pem = std::fs::read_to_string(&key_path)
            .with_context(|| format!("cannot read {}", key_path.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{} is not a valid private key", key_path.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .with_context(|| format!("{} is not a valid CA certificate", cert_path.display()))?;
        Ok(Ca {
            cert_pem,
            cert_path,
            issuer,
        })
    }

    /// Issues a TLS server certificate for `names` (DNS names or IP addresses), valid one year.
    /// Returns (certificate chain PEM, private key PEM, expiry as a Unix time).
    pub fn issue_server(&self, names: &[String]) -> anyhow::Result<(String, String, i64)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names.to_vec())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "apim");
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_else(|| "apim".into()),
        );
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(365);
        let not_after = params.not_after.unix_timestamp();
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((
            format!("{}{}", cert.pem(), self.cert_pem),
            key.serialize_pem(),
            not_after,
        ))
    }
}

/// Days before expiry at which the admin certificate is renewed at start-up.
const RENEW_BEFORE_DAYS: i64 = 30;

/// Loads the admin listener's certificate, or issues a new one when it is missing, was issued
/// for other names, or expires within 30 days. `admin.meta` records the names and the expiry.
pub fn admin_certificate(
    ca: &Ca,
    dir: &Path,
    names: &[String],
) -> anyhow::Result<(String, String)> {
    let cert_path = dir.join("admin.crt");
    let key_path = dir.join("admin.key");
    let meta_path = dir.join("admin.meta");
    let wanted = names.join(",");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let current = std::fs::read_to_string(&meta_path).unwrap_or_default();
    let fresh = match current.trim().split_once(' ') {
        Some((not_after, issued_for)) => {
            issued_for == wanted
                && not_after
                    .parse::<i64>()
                    .is_ok_and(|t| t - now > RENEW_BEFORE_DAYS * 86_400)
        }
        None => false,
    };
    if fresh && cert_path.exists() && key_path.exists() {
        let cert = std::fs::read_to_string(&cert_path)?;
        let key = std::fs::read_to_string(&key_path)?;
        return Ok((cert, key));
    }
    let (cert, key, not_after) = ca.issue_server(names)?;
    write_private(&key_path, key.as_bytes())?;
    write_atomic(&cert_path, cert.as_bytes(), 0o644)?;
    write_atomic(
        &meta_path,
        format!("{not_after} {wanted}\n").as_bytes(),
        0o644,
    )?;
    tracing::info!(names = %wanted, "admin certificate issued");
    Ok((cert, key))
}

/// A rustls server configuration (TLS 1.2 and 1.3, ALPN h2 and http/1.1) for a PEM chain and key.
pub fn server_config(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("invalid certificate PEM: {e}"))?;
    if certs.is_empty() {
        anyhow::bail!("no certificate in the PEM data");
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| anyhow!("invalid private key PEM: {e}"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// What the gateway and the admin API show of a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// DNS names (wildcards kept as `*.example.com`, lowercase) and IP addresses of the leaf's
    /// subjectAltName.
    pub hosts: Vec<String>,
    pub subject: String,
    pub issuer: String,
    pub not_before: time::OffsetDateTime,
    pub not_after: time::OffsetDateTime,
    /// Lowercase hex SHA-256 of the leaf's DER.
    pub fingerprint: String,
}

/// Hex SHA-256 of a DER certificate: the fingerprint clients and consumers are matched by.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der))
}

/// The certificates of a PEM chain, leaf first.
pub fn parse_chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("is not PEM certificate data: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

/// The subject of a DER certificate, as `C=FR, O=Fintech, CN=tpp-one` in certificate order,
/// with RFC 4514 escaping in values (`\,`, `\+`, ...): a value holding a comma can never read
/// like another subject.
pub fn subject_of(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(name_text(cert.subject()))
}

fn name_text(name: &x509_parser::x509::X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut out = Vec::new();
    for rdn in name.iter_rdn() {
        let mut parts = Vec::new();
        for attr in rdn.iter() {
            let kind = x509_parser::objects::oid2abbrev(attr.attr_type(), registry)
                .map(str::to_string)
                .unwrap_or_else(|_| attr.attr_type().to_id_string());
            let value = match attr.as_str() {
                Ok(v) => escape_dn_value(v),
                Err(_) => format!("#{}", hex::encode(attr.attr_value().data)),
            };
            parts.push(format!("{kind}={value}"));
        }
        out.push(parts.join("+"));
    }
    out.join(", ")
}

/// RFC 4514 §2.4 escaping of an attribute value.
fn escape_dn_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if c == '\0' {
            out.push_str("\\00");
            continue;
        }
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Parses a PEM chain (leaf first) and describes its leaf.
pub fn describe_certificate(pem: &str) -> Result<CertInfo, String> {
    let chain = parse_chain(pem)?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0])
        .map_err(|e| format!("the first certificate cannot be parsed: {e}"))?;
    for (i, der) in chain.iter().enumerate().skip(1) {
        x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("certificate {} of the chain cannot be parsed: {e}", i + 1))?;
    }
    let mut hosts = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    hosts.push(d.to_ascii_lowercase())
                }
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    let addr = match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip).ok().map(std::net::IpAddr::from),
                        16 => <[u8; 16]>::try_from(*ip).ok().map(std::net::IpAddr::from),
                        _ => None,
                    };
                    if let Some(a) = addr {
                        hosts.push(a.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let time = |t: x509_parser::time::ASN1Time| {
        time::OffsetDateTime::from_unix_timestamp(t.timestamp())
            .map_err(|_| "has a validity date out of range".to_string())
    };
    Ok(CertInfo {
        hosts,
        subject: name_text(leaf.subject()),
        issuer: name_text(leaf.issuer()),
        not_before: time(leaf.validity().not_before)?,
        not_after: time(leaf.validity().not_after)?,
        fingerprint: fingerprint(&chain[0]),
    })
}

/// A chain and its private key (PEM: PKCS#8, SEC1 or PKCS#1) as rustls serves them, after
/// checking that the key is the one the leaf certifies.
pub fn certified_key(
    chain_pem: &str,
    key_pem: &[u8],
) -> Result<rustls::sign::CertifiedKey, String> {
    let chain = parse_chain(chain_pem)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|_| "is not a PEM private key (PKCS#8, SEC1 or PKCS#1)".to_string())?;
    let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|e| format!("is not a usable private key: {e}"))?;
    let ck = rustls::sign::CertifiedKey::new(chain, signer);
    ck.keys_match()
        .map_err(|_| "does not match the certificate's public key".to_string())?;
    Ok(ck)
}

/// Root store holding the given PEM CA certificates (for clients of the admin API).
pub fn root_store(ca_pem: &str) -> anyhow::Result<rustls::RootCertStore> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(c.map_err(|e| anyhow!("invalid CA PEM: {e}"))?)
            .map_err(|e| anyhow!("unusable CA certificate: {e}"))?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_issues_a_certificate_rustls_accepts() {
        install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let (chain, key, _) = ca
            .issue_server(&["localhost".into(), "127.0.0.1".into()])
            .unwrap();
        server_config(&chain, &key).unwrap();
        // reloading gives the same CA
        let again = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(again.cert_pem, ca.cert_pem);
        assert_eq!(root_store(&ca.cert_pem).unwrap().len(), 1);
    }

    #[test]
    fn secrets_are_random_and_hashed() {
        let a = random_secret("apim_").unwrap();
        let b = random_secret("apim_").unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 5 + 43);
        assert_eq!(secret_hash(&a).len(), 64);
        assert_ne!(secret_hash(&a), secret_hash(&b));
    }

    #[test]
    fn stored_hashes_read_back_as_digests() {
        let secret = random_secret("apim_").unwrap();
        let hash = secret_hash(&secret);
        assert_eq!(secret_hash_digest(&hash), Some(secret_digest(&secret)));
        // the known SHA-256 of "abc"
        assert_eq!(
            secret_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // only what secret_hash writes: 64 lower-case hex digits
        for bad in [
            hash.to_uppercase(),
            hash[..62].to_string(),
            format!("{hash}00"),
            format!("{}g", &hash[..63]),
            String::new(),
        ] {
            assert_eq!(secret_hash_digest(&bad), None, "{bad:?}");
        }
    }
}

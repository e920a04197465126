//! The gateway's TLS: certificates chosen by SNI among the certificate resources, the TLS
//! policy (versions, cipher suites, groups), and client certificates for `mutual-tls` policies.
//!
//! Architecture invariant: the certificate table, like the routing table, is compiled off the
//! request path from the applied state and swapped whole. Private keys are opened here, in
//! memory only, with the cluster's age identity.
//!
//! Client certificates are requested only on connections whose SNI host serves an API with a
//! `mutual-tls` policy. The handshake checks that the client holds the certificate's key;
//! the chain is checked per API, against that API's CA bundle, when the policy runs.

use crate::model::{Kind, Spec};
use crate::secrets::Sealer;
use crate::state::{self, KvRead, StoreError};
use arc_swap::ArcSwap;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, UnixTime};
use std::collections::HashMap;
use std::sync::Arc;

/// The TLS policy of the gateway's listener: TLS 1.3 and 1.2 only; AEAD suites with forward
/// secrecy (AES-GCM, ChaCha20-Poly1305), as ANSSI's TLS guide and Mozilla's "intermediate"
/// profile recommend; groups X25519MLKEM768, X25519, P-256, P-384.
pub fn provider() -> CryptoProvider {
    use rustls::crypto::aws_lc_rs::{cipher_suite as cs, default_provider, kx_group};
    CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: vec![
            kx_group::X25519MLKEM768,
            kx_group::X25519,
            kx_group::SECP256R1,
            kx_group::SECP384R1,
        ],
        ..default_provider()
    }
}

/// One served certificate.
#[derive(Debug)]
pub struct Served {
    pub key: Arc<CertifiedKey>,
    /// Host names of the leaf (`*.example.com` for wildcards), lowercase.
    pub hosts: Vec<String>,
    pub not_after: String,
}

/// Certificates by host name. A host several certificates name gets the one valid longest.
#[derive(Debug, Default)]
pub struct CertTable {
    exact: HashMap<String, Arc<Served>>,
    /// Wildcard certificates (`*.bank.example`) by their suffix (`bank.example`).
    wildcard: HashMap<String, Arc<Served>>,
    /// Every certificate by `tenant/name` (client certificates to upstreams).
    pub by_name: HashMap<String, Arc<CertifiedKey>>,
    pub certificates: usize,
    /// (tenant, certificate, end of validity in Unix seconds) of every certificate served.
    pub expiries: Vec<(String, String, i64)>,
}

/// Keys already opened, by the sealed text: a rebuild opens only new or changed keys.
pub type KeyCache = HashMap<String, Arc<CertifiedKey>>;

impl CertTable {
    /// The certificate for an SNI name: an exact name first, then a wildcard one label up.
    pub fn lookup(&self, sni: &str) -> Option<&Arc<Served>> {
        let sni = sni.trim_end_matches('.').to_ascii_lowercase();
        self.exact.get(&sni).or_else(|| {
            sni.split_once('.')
                .and_then(|(_, suffix)| self.wildcard.get(suffix))
        })
    }

    /// Compiles the table from every tenant's certificates. A certificate whose key cannot be
    /// opened is left out and logged (the others are served).
    /// A tenant's certificates are served only for the hosts its served APIs claim
    /// (`claimed`, by tenant: see [`super::routes::RouteTable::claimed_hosts`]).
    pub fn build(
        kv: &dyn KvRead,
        sealer: &Sealer,
        cache: &mut KeyCache,
        claimed: &HashMap<String, Vec<String>>,
    ) -> Result<CertTable, StoreError> {
        let mut table = CertTable::default();
        let mut fresh = KeyCache::new();
        for tenant in state::list_objects(kv, Kind::Tenant, None)? {
            let t = tenant.spec.name();
            let claimed: &[String] = claimed.get(&t).map(Vec::as_slice).unwrap_or_default();
            for o in state::list_objects(kv, Kind::Certificate, Some(&t))? {
                let Spec::Certificate(c) = o.spec else {
                    continue;
                };
                // by certificate and key: a renewal that keeps the key serves the new chain
                let cache_key = format!(
                    "{}|{}",
                    crate::pki::secret_hash(&c.certificate),
                    c.private_key
                );
                let key = match cache.get(&cache_key) {
                    Some(k) => k.clone(),
                    None => {
                        let opened = sealer
                            .open_for(&t, &c.private_key)
                            .map_err(|e| format!("{e:?}"))
                            .and_then(|plain| crate::pki::certified_key(&c.certificate, &plain));
                        match opened {
                            Ok(k) => Arc::new(k),
                            Err(e) => {
                                tracing::error!(tenant = %t, certificate = %c.name, error = %e, "certificate not served: its key cannot be opened");
                                continue;
                            }
                        }
                    }
                };
                fresh.insert(cache_key, key.clone());
                table.by_name.insert(format!("{t}/{}", c.name), key.clone());
                let served = Arc::new(Served {
                    key,
                    hosts: c.hosts.clone(),
                    not_after: c.not_after.clone(),
                });
                table.certificates += 1;
                match time::OffsetDateTime::parse(
                    &c.not_after,
                    &time::format_description::well_known::Rfc3339,
                ) {
                    Ok(t_end) => {
                        let not_after = t_end.unix_timestamp();
                        let left_days = (not_after
                            - time::OffsetDateTime::now_utc().unix_timestamp())
                        .div_euclid(86_400);
                        if left_days < 30 {
                            tracing::warn!(tenant = %t, certificate = %c.name, not_after = %c.not_after, days_left = left_days, "gateway certificate expires within 30 days (or has expired): renew it");
                        }
                        table.expiries.push((t.clone(), c.name.clone(), not_after));
                    }
                    // written by the admin API from the certificate itself: not expected
                    Err(e) => {
                        tracing::error!(tenant = %t, certificate = %c.name, not_after = %c.not_after, error = %e, "gateway certificate's end of validity cannot be read; no expiry metric for it")
                    }
                }
                for host in c.hosts.iter().filter(|h| claims(claimed, h)) {
                    let slot = match host.strip_prefix("*.") {
                        Some(suffix) => table.wildcard.entry(suffix.to_string()),
                        None => table.exact.entry(host.clone()),
                    };
                    match slot {
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(served.clone());
                        }
                        std::collections::hash_map::Entry::Occupied(mut o) => {
                            if o.get().not_after < served.not_after {
                                o.insert(served.clone());
                            }
                        }
                    }
                }
            }
        }
        *cache = fresh;
        Ok(table)
    }
}

/// Whether a certificate name is claimed by one of a tenant's API hosts: the same name, an API
/// wildcard covering it, or (for a wildcard name) an API host it covers.
fn claims(api_hosts: &[String], cert_host: &str) -> bool {
    let suffix = |h: &str| h.split_once('.').map(|(_, s)| s.to_string());
    api_hosts.iter().any(|a| {
        a == cert_host
            || match (a.strip_prefix("*."), cert_host.strip_prefix("*.")) {
                (Some(api_wild), None) => suffix(cert_host).as_deref() == Some(api_wild),
                (None, Some(cert_wild)) => suffix(a).as_deref() == Some(cert_wild),
                _ => false,
            }
    })
}

/// Whether `host` is one of the certificate's names (a wildcard covers one label).
pub fn covers(hosts: &[String], host: &str) -> bool {
    let host = host.trim_end_matches('.');
    // an IPv6 literal comes bracketed in Host
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    hosts.iter().any(|h| match h.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => h.eq_ignore_ascii_case(host),
    })
}

/// Resolves the server certificate from the current table by SNI.
#[derive(Debug)]
pub struct SniResolver {
    pub table: ArcSwap<CertTable>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name()?;
        self.table.load().lookup(sni).map(|s| s.key.clone())
    }
}

/// Asks for a client certificate, accepts any chain, and checks the handshake signature (so the
/// client holds the key). Chains are checked later, per API.
#[derive(Debug)]
pub struct AnyClientCert {
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl AnyClientCert {
    pub fn new(provider: &CryptoProvider) -> AnyClientCert {
        AnyClientCert {
            algorithms: provider.signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The two server configurations of the HTTPS listener (with and without a client-certificate
/// request), sharing one SNI resolver.
pub struct TlsConfigs {
    pub resolver: Arc<SniResolver>,
    pub plain: Arc<rustls::ServerConfig>,
    pub client_auth: Arc<rustls::ServerConfig>,
}

impl TlsConfigs {
    pub fn new() -> anyhow::Result<TlsConfigs> {
        let provider = Arc::new(provider());
        let resolver = Arc::new(SniResolver {
            table: ArcSwap::from_pointee(CertTable::default()),
        });
        let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
        let make = |client: Option<Arc<dyn ClientCertVerifier>>| -> anyhow::Result<_> {
            let b = rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&versions)?;
            let mut cfg = match client {
                Some(v) => b.with_client_cert_verifier(v),
                None => b.with_no_client_auth(),
            }
            .with_cert_resolver(resolver.clone());
            cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Ok(Arc::new(cfg))
        };
        Ok(TlsConfigs {
            plain: make(None)?,
            client_auth: make(Some(Arc::new(AnyClientCert::new(&provider))))?,
            resolver,
        })
    }
}

/// Serves one certificate whatever the client hello says (clients without SNI).
#[derive(Debug)]
pub struct Fixed(pub Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Presents one fixed certificate when an upstream asks for a client certificate.
#[derive(Debug)]
pub struct FixedClientCert(pub Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// What a request knows of its connection's TLS.
#[derive(Debug, Default)]
pub struct TlsConn {
    pub sni: Option<String>,
    /// Host names of the certificate the gateway presented.
    pub served_hosts: Vec<String>,
    /// The client's chain (leaf first), when it sent one.
    pub client_chain: Vec<CertificateDer<'static>>,
    /// Whether the handshake asked for a client certificate (the SNI host serves a
    /// `mutual-tls` API).
    pub client_auth_requested: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        let hosts = vec!["*.bank.example".to_string(), "bank.example".to_string()];
        assert!(covers(&hosts, "api.bank.example"));
        assert!(covers(&hosts, "API.Bank.Example."));
        assert!(covers(&hosts, "bank.example"));
        assert!(!covers(&hosts, "a.b.bank.example"));
        assert!(!covers(&hosts, "evilbank.example"));
        assert!(!covers(&hosts, ".bank.example"));
    }

    #[test]
    fn certificates_serve_only_claimed_hosts() {
        let apis = vec![
            "api.bank.example".to_string(),
            "*.eu.bank.example".to_string(),
        ];
        assert!(claims(&apis, "api.bank.example"));
        assert!(
            claims(&apis, "*.bank.example"),
            "a wildcard covering an API host"
        );
        assert!(
            claims(&apis, "fr.eu.bank.example"),
            "a name an API wildcard covers"
        );
        assert!(claims(&apis, "*.eu.bank.example"));
        assert!(!claims(&apis, "other.example"));
        assert!(!claims(&apis, "*.example"));
        assert!(!claims(&apis, "x.y.eu.bank.example"));
    }

    #[test]
    fn policy_is_tls12_and_13_aead_only() {
        let p = provider();
        for s in &p.cipher_suites {
            let name = format!("{:?}", s.suite());
            assert!(
                name.contains("GCM") || name.contains("CHACHA20"),
                "{name} is not an AEAD suite"
            );
            assert!(
                name.starts_with("TLS13_") || name.contains("ECDHE"),
                "{name}"
            );
        }
    }
}

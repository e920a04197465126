//! JWT and JWKS parsing on arbitrary input: a token that is not signed by the issuer's key is
//! never accepted, and nothing panics. The input is tried as a bearer token against a fixed
//! JWKS, and as a JWKS document.
#![no_main]

use apim::gateway::routes::{jwks_keys, JwtKey};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// The keys of a P-256 key pair made at start-up, whose private half is then dropped.
fn keys() -> &'static Vec<JwtKey> {
    static KEYS: OnceLock<Vec<JwtKey>> = OnceLock::new();
    KEYS.get_or_init(|| {
        use base64::Engine as _;
        apim::pki::install_crypto_provider();
        let pair = rcgen::KeyPair::generate().expect("P-256 key");
        let point = pair.public_key_raw(); // 0x04 || X || Y
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let doc = format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"k1","alg":"ES256","x":"{}","y":"{}"}}]}}"#,
            b64(&point[1..33]),
            b64(&point[33..65])
        );
        let keys = jwks_keys(&doc);
        assert_eq!(keys.len(), 1);
        keys
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut headers = http::HeaderMap::new();
    if let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {text}")) {
        headers.insert(http::header::AUTHORIZATION, v);
    }
    // the private key is gone: no input may pass
    assert!(!apim::gateway::bearer_token_valid(
        &headers,
        keys(),
        "https://idp.bank.example",
        "accounts",
        &[],
        60
    ));
    let _ = jwks_keys(&text);
});

//! The gateway's HTTPS listener end to end: certificate resources chosen by SNI (two names),
//! private keys sealed at rest, HTTP/1.1 and HTTP/2 by ALPN, TLS 1.2 and 1.3, misdirected
//! requests, and mutual TLS mapping client certificates to consumers.

mod common;
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use reqwest::Method;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

const SEALED: &str = "-----BEGIN AGE ENCRYPTED FILE-----";

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().expect("key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = p.self_signed(&key).expect("self-signed");
    let pem = cert.pem();
    Ca {
        issuer: Issuer::from_ca_cert_pem(&pem, key).expect("issuer"),
        pem,
    }
}

/// A leaf for `names` (server) or a client certificate (no names), valid from an hour ago for
/// `days`. Returns (chain PEM, key PEM).
fn leaf(ca: &Ca, names: &[&str], subject: &[(DnType, &str)], days: i64) -> (String, String) {
    let key = KeyPair::generate().expect("key");
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let mut dn = DistinguishedName::new();
    for (t, v) in subject {
        dn.push(t.clone(), *v);
    }
    p.distinguished_name = dn;
    p.extended_key_usages = vec![if names.is_empty() {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::days(2);
    p.not_after = now + time::Duration::days(days);
    let cert = p.signed_by(&key, &ca.issuer).expect("signed");
    (cert.pem(), key.serialize_pem())
}

fn der(pem: &str) -> Vec<u8> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .expect("a certificate")
        .expect("PEM")
        .to_vec()
}

struct Client {
    http: reqwest::Client,
    port: u16,
}

/// A client that trusts `ca_pem`, resolves every `hosts` name to loopback, offers `alpn`, and
/// presents `identity` (chain PEM, key PEM) when asked.
fn client(
    n: &Node,
    ca_pem: &str,
    hosts: &[&str],
    alpn: &[&[u8]],
    tls12_only: bool,
    identity: Option<(&str, &str)>,
) -> Client {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12_only {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13, &rustls::version::TLS12]
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("PEM")).expect("root");
    }
    let b = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots);
    let mut cfg = match identity {
        Some((chain, key)) => b
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(chain.as_bytes())
                    .map(|c| c.expect("PEM"))
                    .collect(),
                rustls_pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key"),
            )
            .expect("client auth"),
        None => b.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let mut builder = reqwest::Client::builder()
        .use_preconfigured_tls(cfg)
        .tls_info(true)
        .timeout(Duration::from_secs(20));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", n.gateway_tls_port).parse().unwrap();
    for h in hosts {
        builder = builder.resolve(h, addr);
    }
    Client {
        http: builder.build().expect("client"),
        port: n.gateway_tls_port,
    }
}

impl Client {
    async fn get(&self, host: &str, path: &str) -> Result<reqwest::Response, reqwest::Error> {
        self.http
            .get(format!("https://{host}:{}{path}", self.port))
            .send()
            .await
    }
}

fn peer_cert(r: &reqwest::Response) -> Vec<u8> {
    r.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("peer certificate")
        .to_vec()
}

async fn add_certificate(n: &Node, tenant: &str, name: &str, chain: &str, key: &str) -> Resp {
    n.admin(
        Method::POST,
        &format!("/admin/v1/tenants/{tenant}/certificates"),
        Some(json!({"name": name, "certificate": chain, "private_key": key})),
    )
    .await
}

async fn publish(n: &Node, tenant: &str, name: &str, hosts: &[&str], up: &str, policies: Value) {
    created(
        n,
        &format!("/admin/v1/tenants/{tenant}/apis"),
        json!({
            "name": name, "version": "v1", "hosts": hosts, "base_path": "/",
            "upstream": {"targets": [{"url": format!("http://{up}")}]},
            "policies": policies, "lifecycle": "published",
        }),
    )
    .await;
}

/// Retries until the gateway's tables reflect the last commit (they are swapped after it).
async fn until_ok(c: &Client, host: &str, path: &str) -> reqwest::Response {
    let mut last = None;
    for _ in 0..100 {
        match c.get(host, path).await {
            Ok(r) if r.status() == 200 => return r,
            other => last = Some(other),
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    panic!("{host}{path} never answered 200: {last:?}");
}

fn files_under(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_serves_each_host_its_certificate_with_keys_sealed_at_rest() {
    let mut n = Node::start().await;
    let up = echo_upstream().await.to_string();
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    let server_ca = ca("acme server CA");
    let (a_chain, a_key) = leaf(&server_ca, &["a.example"], &[(DnType::CommonName, "a")], 90);
    let (b_chain, b_key) = leaf(
        &server_ca,
        &["*.b.example"],
        &[(DnType::CommonName, "b")],
        90,
    );

    // Refusals name the field and store nothing.
    let r = add_certificate(&n, "acme", "bad", &a_chain, &b_key).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.body["invalid-params"][0]["name"], "private_key");
    assert!(r.body["detail"]
        .as_str()
        .unwrap()
        .contains("does not match"));
    let r = add_certificate(&n, "acme", "bad", "not a certificate", &a_key).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.body["invalid-params"][0]["name"], "certificate");
    let (old_chain, old_key) = leaf(&server_ca, &["old.example"], &[], -1);
    let r = add_certificate(&n, "acme", "bad", &old_chain, &old_key).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(r.body["detail"].as_str().unwrap().contains("expired"));
    let r = add_certificate(
        &n,
        "acme",
        "bad",
        &a_chain,
        "-----BEGIN AGE ENCRYPTED FILE-----\nx\n-----END AGE ENCRYPTED FILE-----\n",
    )
    .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.body["invalid-params"][0]["name"], "private_key");
    let r = n
        .admin(Method::GET, "/admin/v1/tenants/acme/certificates", None)
        .await;
    assert_eq!(
        r.body["items"].as_array().map(Vec::len),
        Some(0),
        "{:?}",
        r.body
    );

    // The API answers with the facts of the certificate and the key sealed.
    let r = add_certificate(&n, "acme", "site-a", &a_chain, &a_key).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["hosts"], json!(["a.example"]));
    assert_eq!(r.body["subject"], "CN=a");
    assert_eq!(
        r.body["fingerprint"],
        apim::pki::fingerprint(&der(&a_chain))
    );
    let sealed = r.body["private_key"].as_str().unwrap();
    assert!(sealed.starts_with(SEALED), "{sealed}");
    assert!(!r.body.to_string().contains("PRIVATE KEY"));
    let r = add_certificate(&n, "acme", "site-b", &b_chain, &b_key).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    // A replace that sends the sealed key back (GET, edit, PUT) keeps it.
    let mut edited = r.body.clone();
    edited["description"] = json!("wildcard for b");
    let r2 = n
        .req(
            Method::PUT,
            "/admin/v1/tenants/acme/certificates/site-b",
            Some(&n.token),
            Some(edited),
            &[("if-match", &r.etag())],
        )
        .await;
    assert_eq!(r2.status, 200, "{:?}", r2.body);
    assert_eq!(r2.body["private_key"], r.body["private_key"]);

    publish(
        &n,
        "acme",
        "web",
        &["a.example", "x.b.example"],
        &up,
        json!([]),
    )
    .await;
    let c = client(
        &n,
        &server_ca.pem,
        &["a.example", "x.b.example", "c.example"],
        &[b"h2", b"http/1.1"],
        false,
        None,
    );
    let r = until_ok(&c, "a.example", "/hello").await;
    assert_eq!(peer_cert(&r), der(&a_chain));
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN h2");
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
    let r = until_ok(&c, "x.b.example", "/hello").await;
    assert_eq!(peer_cert(&r), der(&b_chain));

    // HTTP/1.1 by ALPN, and TLS 1.2
    let c11 = client(
        &n,
        &server_ca.pem,
        &["a.example"],
        &[b"http/1.1"],
        true,
        None,
    );
    let r = c11.get("a.example", "/").await.expect("TLS 1.2 + HTTP/1.1");
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_11);

    // A name no certificate covers gets no handshake; the failure is counted.
    assert!(c.get("c.example", "/").await.is_err());
    let exposed = metrics(&n).await;
    assert!(
        exposed.contains("apim_gateway_tls_handshake_failures_total{cause=\"unknown-sni\"}"),
        "{exposed}"
    );
    assert!(exposed.contains("apim_gateway_certificates 2"), "{exposed}");
    // each certificate's end of validity, for an expiry alert
    for name in ["site-a", "site-b"] {
        let r = n
            .admin(
                Method::GET,
                &format!("/admin/v1/tenants/acme/certificates/{name}"),
                None,
            )
            .await;
        let not_after = time::OffsetDateTime::parse(
            r.body["not_after"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
        .unix_timestamp();
        let line = format!("apim_gateway_certificate_expiry_timestamp_seconds{{tenant=\"acme\",certificate=\"{name}\"}} {not_after}\n");
        assert!(exposed.contains(&line), "{line} in {exposed}");
    }

    // A request for a host the connection's certificate does not cover is misdirected.
    let r = c11
        .http
        .get(format!("https://a.example:{}/", c11.port))
        .header("host", "x.b.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 421);

    // A client without SNI (it connects to an IP address) gets the certificate naming that
    // address.
    let (ip_chain, ip_key) = leaf(
        &server_ca,
        &["127.0.0.1"],
        &[(DnType::CommonName, "ip")],
        90,
    );
    let r = add_certificate(&n, "acme", "by-address", &ip_chain, &ip_key).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(r.body["hosts"], json!(["127.0.0.1"]));
    publish(&n, "acme", "by-ip", &["127.0.0.1"], &up, json!([])).await;
    let mut served = None;
    for _ in 0..100 {
        if let Ok(r) = c11
            .http
            .get(format!("https://127.0.0.1:{}/", c11.port))
            .send()
            .await
        {
            if r.status() == 200 {
                served = Some(peer_cert(&r));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(served, Some(der(&ip_chain)));

    // Another tenant cannot take the hosts over: its certificate for a.example (valid longer)
    // is not served, since no API of that tenant claims the host; nor can it reuse the sealed
    // key of this tenant's certificate.
    created(&n, "/admin/v1/tenants", json!({"name": "rival"})).await;
    let (rival_chain, rival_key) = leaf(
        &server_ca,
        &["a.example"],
        &[(DnType::CommonName, "rival")],
        900,
    );
    assert_eq!(
        add_certificate(&n, "rival", "grab", &rival_chain, &rival_key)
            .await
            .status,
        201
    );
    let sealed_a = n
        .admin(
            Method::GET,
            "/admin/v1/tenants/acme/certificates/site-a",
            None,
        )
        .await
        .body["private_key"]
        .as_str()
        .unwrap()
        .to_string();
    let r = add_certificate(&n, "rival", "steal", &a_chain, &sealed_a).await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert!(
        r.body["detail"]
            .as_str()
            .unwrap()
            .contains("another tenant"),
        "{:?}",
        r.body
    );
    // wait until the certificate table holds the rival's certificate, so that what follows
    // is a real choice between the two
    let mut rebuilt = false;
    for _ in 0..100 {
        if metrics(&n).await.contains("apim_gateway_certificates 4") {
            rebuilt = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(rebuilt, "the rival's certificate is in the table");
    // a new connection, so a new handshake
    let fresh = client(
        &n,
        &server_ca.pem,
        &["a.example"],
        &[b"http/1.1"],
        false,
        None,
    );
    let r = fresh.get("a.example", "/").await.expect("answer");
    assert_eq!(
        peer_cert(&r),
        der(&a_chain),
        "the host's own tenant's certificate"
    );

    // No file of the node holds the private key in clear.
    let needle = a_key.lines().nth(1).expect("key body line").to_string();
    let mut files = Vec::new();
    files_under(&n.dir, &mut files);
    assert!(files.len() > 3);
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "{} holds the private key in clear",
            f.display()
        );
    }

    // After a restart the keys are opened again with the node's identity.
    n.terminate();
    n.boot().await;
    let c = client(&n, &server_ca.pem, &["a.example"], &[b"h2"], false, None);
    let r = until_ok(&c, "a.example", "/").await;
    assert_eq!(peer_cert(&r), der(&a_chain));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_maps_client_certificates_to_consumers() {
    let n = Node::start().await;
    let up = echo_upstream().await.to_string();
    let t = "/admin/v1/tenants/bank";
    created(&n, "/admin/v1/tenants", json!({"name": "bank"})).await;
    let server_ca = ca("bank server CA");
    let (chain, key) = leaf(&server_ca, &["psd2.example", "open.example"], &[], 90);
    assert_eq!(
        add_certificate(&n, "bank", "psd2", &chain, &key)
            .await
            .status,
        201
    );

    let tpp_ca = ca("QWAC issuing CA");
    let rogue_ca = ca("rogue CA");
    let subject = [
        (DnType::CountryName, "FR"),
        (DnType::OrganizationName, "Fintech"),
        (DnType::CommonName, "tpp-one"),
    ];
    let (tpp_chain, tpp_key) = leaf(&tpp_ca, &[], &subject, 30);
    let (rogue_chain, rogue_key) = leaf(&rogue_ca, &[], &subject, 30);
    let (other_chain, other_key) = leaf(&tpp_ca, &[], &[(DnType::CommonName, "tpp-unknown")], 30);
    let fp = apim::pki::fingerprint(&der(&tpp_chain));

    created(&n, &format!("{t}/plans"), json!({"name": "p"})).await;
    let r = n
        .admin(
            Method::POST,
            &format!("{t}/consumers"),
            Some(json!({"name": "bad", "client_certificates": ["sha256:xyz"]})),
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(
        r.body["invalid-params"][0]["name"],
        "client_certificates[0]"
    );
    created(
        &n,
        &format!("{t}/consumers"),
        json!({"name": "tpp-one", "client_certificates": ["C=FR, O=Fintech, CN=tpp-one"]}),
    )
    .await;
    created(
        &n,
        &format!("{t}/consumers"),
        json!({"name": "tpp-fp", "client_certificates": [format!("sha256:{fp}")]}),
    )
    .await;
    // a certificate maps to one consumer: another consumer cannot list the same identity
    // (written differently: the fingerprint in upper case, the subject with other spacing)
    for (name, id) in [
        ("tpp-twin", format!("sha256:{}", fp.to_ascii_uppercase())),
        ("tpp-twin", "C=FR,O=Fintech,  CN=tpp-one".to_string()),
    ] {
        let r = n
            .admin(
                Method::POST,
                &format!("{t}/consumers"),
                Some(json!({"name": name, "client_certificates": [id]})),
            )
            .await;
        assert_eq!(r.status, 409, "{id}: {:?}", r.body);
        assert_eq!(r.body["invalid-params"][0]["name"], "client_certificates");
        assert!(
            r.body.to_string().contains("already maps to consumer"),
            "{:?}",
            r.body
        );
    }
    // a consumer that gives its identity up frees it for another
    let r = n
        .admin(Method::GET, &format!("{t}/consumers/tpp-fp"), None)
        .await;
    let mut body = r.body.clone();
    body["client_certificates"] = json!([]);
    let r = n
        .req(
            Method::PUT,
            &format!("{t}/consumers/tpp-fp"),
            Some(&n.token),
            Some(body.clone()),
            &[("if-match", &r.etag())],
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    created(
        &n,
        &format!("{t}/consumers"),
        json!({"name": "tpp-twin", "client_certificates": [format!("sha256:{fp}")]}),
    )
    .await;
    let r = n
        .admin(Method::DELETE, &format!("{t}/consumers/tpp-twin"), None)
        .await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    body["client_certificates"] = json!([format!("sha256:{fp}")]);
    let r = n
        .req(
            Method::PUT,
            &format!("{t}/consumers/tpp-fp"),
            Some(&n.token),
            Some(body),
            &[("if-match", "*")],
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let mtls =
        |map_by: &str| json!([{"type": "mutual-tls", "ca_bundle": tpp_ca.pem, "map_by": map_by}]);
    let r = n
        .admin(
            Method::POST,
            &format!("{t}/apis"),
            Some(json!({
                "name": "broken", "version": "v1", "hosts": ["x.example"], "base_path": "/",
                "upstream": {"targets": [{"url": "http://127.0.0.1:9"}]},
                "policies": [{"type": "mutual-tls", "ca_bundle": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"}],
            })),
        )
        .await;
    assert_eq!(r.status, 422, "{:?}", r.body);
    assert_eq!(r.body["invalid-params"][0]["name"], "policies[0].ca_bundle");
    publish(
        &n,
        "bank",
        "accounts",
        &["psd2.example"],
        &up,
        mtls("subject"),
    )
    .await;
    created(
        &n,
        &format!("{t}/apis"),
        json!({
            "name": "payments", "version": "v1", "hosts": ["psd2.example"],
            "base_path": "/payments", "lifecycle": "published",
            "upstream": {"targets": [{"url": format!("http://{up}")}]},
            "policies": mtls("fingerprint"),
        }),
    )
    .await;
    publish(&n, "bank", "open", &["open.example"], &up, json!([])).await;
    for (consumer, api) in [("tpp-one", "accounts"), ("tpp-fp", "payments")] {
        created(
            &n,
            &format!("{t}/subscriptions"),
            json!({"consumer": consumer, "api": api, "plan": "p", "status": "active"}),
        )
        .await;
    }

    let hosts = ["psd2.example", "open.example"];
    let good = client(
        &n,
        &server_ca.pem,
        &hosts,
        &[b"http/1.1"],
        false,
        Some((&tpp_chain, &tpp_key)),
    );
    let r = until_ok(&good, "psd2.example", "/accounts/1").await;
    let echo: Value = r.json().await.unwrap();
    assert_eq!(echo["uri"], "/accounts/1");
    // by fingerprint: the same certificate is consumer tpp-fp on the payments API
    let r = good.get("psd2.example", "/payments/1").await.unwrap();
    assert_eq!(r.status(), 200);
    // an API without the policy does not need a certificate
    let anon = client(&n, &server_ca.pem, &hosts, &[b"h2"], false, None);
    assert_eq!(anon.get("open.example", "/").await.unwrap().status(), 200);

    // no certificate, another CA, an unmapped certificate: the same 401
    let rogue = client(
        &n,
        &server_ca.pem,
        &hosts,
        &[b"h2"],
        false,
        Some((&rogue_chain, &rogue_key)),
    );
    let other = client(
        &n,
        &server_ca.pem,
        &hosts,
        &[b"h2"],
        false,
        Some((&other_chain, &other_key)),
    );
    for (who, c) in [("none", &anon), ("rogue", &rogue), ("unmapped", &other)] {
        let r = c.get("psd2.example", "/accounts/1").await.unwrap();
        assert_eq!(r.status(), 401, "{who}");
        let body: Value = r.json().await.unwrap();
        assert!(
            body["type"] == "urn:apim:problem:gateway:invalid-client-certificate",
            "{who}: {body}"
        );
        assert_eq!(
            body["detail"], "this API requires a valid client certificate",
            "{who}"
        );
    }
    // tpp-one is not subscribed to payments by subject mapping, and tpp-fp has no subject entry
    let r = other.get("psd2.example", "/payments/1").await.unwrap();
    assert_eq!(r.status(), 401);

    // a connection opened for a host without mutual TLS (no certificate was asked for) is sent
    // to open one for the mutual-TLS host
    let anon11 = client(&n, &server_ca.pem, &hosts, &[b"http/1.1"], false, None);
    let r = anon11
        .http
        .get(format!("https://open.example:{}/accounts/1", anon11.port))
        .header("host", "psd2.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 421);

    // the consumer is in the access log
    let log = n
        .log_with(|l| l.contains("apim::gateway::access") && l.contains("\"api\":\"accounts\""))
        .await;
    let line = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| {
            l["target"] == "apim::gateway::access" && l["api"] == "accounts" && l["status"] == 200
        })
        .expect("an access line");
    assert_eq!(line["consumer"], "tpp-one", "{line}");
}

/// The TLS side of a test upstream: `server` (PEM chain, PEM key) as its certificate, `clients`
/// deciding on client certificates, `alpn` offered.
fn upstream_acceptor(
    server: (&str, &str),
    clients: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    alpn: &[&[u8]],
) -> tokio_rustls::TlsAcceptor {
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_client_cert_verifier(clients)
    .with_single_cert(
        CertificateDer::pem_slice_iter(server.0.as_bytes())
            .map(|c| c.unwrap())
            .collect(),
        rustls_pki_types::PrivateKeyDer::from_pem_slice(server.1.as_bytes()).unwrap(),
    )
    .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

/// An HTTPS upstream (HTTP/2 or HTTP/1.1 by ALPN) that requires a client certificate from
/// `client_ca` and echoes the protocol version and the client's subject.
async fn tls_upstream(server: (&str, &str), client_ca: &str) -> std::net::SocketAddr {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(client_ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let acceptor = upstream_acceptor(server, verifier, &[b"h2", b"http/1.1"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let subject = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| apim::pki::subject_of(c))
                    .unwrap_or_default();
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let body = json!({"version": format!("{:?}", req.version()), "client": subject, "uri": req.uri().path()});
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(body.to_string())),
                            ))
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstreams_with_a_private_ca_and_a_client_certificate() {
    let n = Node::start().await;
    let t = "/admin/v1/tenants/corp";
    created(&n, "/admin/v1/tenants", json!({"name": "corp"})).await;
    let upstream_ca = ca("internal services CA");
    let gateway_ca = ca("gateway clients CA");
    let server = leaf(
        &upstream_ca,
        &["upstream.internal"],
        &[(DnType::CommonName, "svc")],
        30,
    );
    let (client_chain, client_key) = leaf(
        &gateway_ca,
        &[],
        &[(DnType::CommonName, "apim gateway")],
        30,
    );
    let up = tls_upstream((&server.0, &server.1), &gateway_ca.pem).await;
    let r = add_certificate(&n, "corp", "gw-client", &client_chain, &client_key).await;
    assert_eq!(r.status, 201, "{:?}", r.body);

    let api = |name: &str, tls: Value| {
        json!({
            "name": name, "version": "v1", "hosts": [format!("{name}.example")], "base_path": "/",
            "lifecycle": "published",
            "upstream": {"targets": [{"url": format!("https://{up}/base")}], "tls": tls},
        })
    };
    // refusals name the field
    for (tls, field) in [
        (Value::Null, "upstream.tls"),
        (json!({"ca_bundle": "nope"}), "upstream.tls.ca_bundle"),
        (
            json!({"ca_bundle": upstream_ca.pem, "client_certificate": "missing"}),
            "upstream.tls.client_certificate",
        ),
        (
            json!({"ca_bundle": upstream_ca.pem, "server_name": "bad name"}),
            "upstream.tls.server_name",
        ),
    ] {
        let mut body = api("x", tls);
        if body["upstream"]["tls"].is_null() {
            body["upstream"].as_object_mut().unwrap().remove("tls");
        }
        let r = n
            .admin(Method::POST, &format!("{t}/apis"), Some(body))
            .await;
        assert_eq!(r.status, 422, "{field}: {:?}", r.body);
        assert_eq!(r.body["invalid-params"][0]["name"], field, "{:?}", r.body);
    }

    let good = json!({"ca_bundle": upstream_ca.pem, "client_certificate": "gw-client",
                      "server_name": "upstream.internal"});
    let mut svc = api("svc", good);
    // health checks go over the same TLS settings
    svc["upstream"]["health_check"] = json!({"path": "/health", "interval_seconds": 1,
                                             "unhealthy_threshold": 1, "healthy_threshold": 1});
    created(&n, &format!("{t}/apis"), svc).await;
    let wrong_ca = json!({"ca_bundle": gateway_ca.pem, "client_certificate": "gw-client",
                          "server_name": "upstream.internal"});
    created(&n, &format!("{t}/apis"), api("wrongca", wrong_ca)).await;
    let no_client = json!({"ca_bundle": upstream_ca.pem, "server_name": "upstream.internal"});
    created(&n, &format!("{t}/apis"), api("anon", no_client)).await;

    let http = reqwest::Client::new();
    let get = |host: &'static str| {
        let http = http.clone();
        let url = format!("http://127.0.0.1:{}/v", n.gateway_port);
        async move {
            let r = http.get(url).header("host", host).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let mut last = (0, Value::Null);
    for _ in 0..100 {
        last = get("svc.example").await;
        if last.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(last.0, 200, "{:?}", last.1);
    assert_eq!(
        last.1["version"], "HTTP/2.0",
        "HTTP/2 to the upstream by ALPN"
    );
    assert_eq!(last.1["client"], "CN=apim gateway");
    assert_eq!(last.1["uri"], "/base/v");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        get("svc.example").await.0,
        200,
        "the HTTPS health checks pass"
    );
    // an upstream certificate from another CA, or no client certificate: the handshake fails
    assert_eq!(get("wrongca.example").await.0, 502);
    assert_eq!(get("anon.example").await.0, 502);

    // a certificate an API presents cannot be deleted from under it
    let r = n
        .admin(Method::DELETE, &format!("{t}/certificates/gw-client"), None)
        .await;
    assert_eq!(r.status, 409, "{:?}", r.body);
}

/// A client that stops taking its answer over TLS is cut after the idle timeout: the bound
/// sits on the socket, below TLS (HTTP/1.1; an HTTP/2 stream is held by flow control instead,
/// without filling the socket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_that_stops_reading_is_cut_after_the_idle_timeout() {
    const BIG: usize = 64 << 20;
    let n = Node::start_with("[gateway]\nidle_timeout_seconds = 2\n").await;
    let up = big_upstream(BIG).await.to_string();
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    let server_ca = ca("acme server CA");
    let (chain, key) = leaf(
        &server_ca,
        &["big.example"],
        &[(DnType::CommonName, "big")],
        90,
    );
    let r = add_certificate(&n, "acme", "big", &chain, &key).await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    publish(&n, "acme", "big", &["big.example"], &up, json!([])).await;
    let c = client(
        &n,
        &server_ca.pem,
        &["big.example"],
        &[b"http/1.1"],
        false,
        None,
    );
    let mut resp = until_ok(&c, "big.example", "/").await;
    let mut got = resp
        .chunk()
        .await
        .expect("a first part")
        .map_or(0, |b| b.len());
    tokio::time::sleep(Duration::from_secs(4)).await;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(b)) = resp.chunk().await {
            got += b.len();
        }
    })
    .await;
    assert!(ended.is_ok(), "the stalled answer was never cut off");
    assert!(got < BIG, "the whole answer came: {got} bytes");
}

/// An HTTPS upstream speaking HTTP/1.1 that answers `200 ok` as soon as it has a request head,
/// then reads what else comes until the gateway closes the connection; it tells `closed`, for
/// each connection that carried a POST, how long after its answer the connection ended.
async fn answer_first_upstream(
    server: &(String, String),
    closed: tokio::sync::mpsc::UnboundedSender<Duration>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let acceptor = upstream_acceptor(
        (&server.0, &server.1),
        Arc::new(rustls::server::NoClientAuth),
        &[b"http/1.1"],
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, closed) = (acceptor.clone(), closed.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut seen = Vec::new();
                let mut buf = [0u8; 16 * 1024];
                let mut answered = None;
                loop {
                    let n = tls.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    seen.extend_from_slice(&buf[..n]);
                    // every complete head is answered at once (keep-alive GETs included);
                    // `GET /stall` gets 7 bytes of the 100 its head announces, and no more;
                    // `POST /wait` gets no answer at all
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        if seen.starts_with(b"POST /wait ") {
                            seen.clear();
                            answered = Some(std::time::Instant::now());
                            break;
                        }
                        let post = seen.starts_with(b"POST");
                        let answer: &[u8] = if seen.starts_with(b"GET /stall ") {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial"
                        } else {
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
                        };
                        seen.drain(..end + 4);
                        if tls.write_all(answer).await.is_err() {
                            return;
                        }
                        if post {
                            answered = Some(std::time::Instant::now());
                            // the rest is the POST's body: read, never parsed
                            seen.clear();
                            break;
                        }
                    }
                    if answered.is_some() {
                        seen.clear();
                    }
                }
                if let Some(at) = answered {
                    let _ = closed.send(at.elapsed());
                }
            });
        }
    });
    addr
}

/// A client that stops sending its request body once the answer has come does not hold the
/// HTTPS upstream's connection (hyper's client pulls the body in its own task, past the
/// answer): the body is cut after the idle timeout, and the upstream connection closed. An
/// HTTPS upstream that stops sending its answer's body does not hold the client: the answer
/// is cut after the upstream response timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_bodies_that_stop_coming_are_cut() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let n = Node::start_with(
        "[gateway]\nidle_timeout_seconds = 2\nupstream_response_timeout_seconds = 3\n",
    )
    .await;
    created(&n, "/admin/v1/tenants", json!({"name": "acme"})).await;
    let upstream_ca = ca("internal services CA");
    let server = leaf(
        &upstream_ca,
        &["upstream.internal"],
        &[(DnType::CommonName, "svc")],
        30,
    );
    let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
    let up = answer_first_upstream(&server, closed_tx).await;
    created(
        &n,
        "/admin/v1/tenants/acme/apis",
        json!({
            "name": "stall", "version": "v1", "hosts": ["stall.example"], "base_path": "/",
            "lifecycle": "published",
            "upstream": {"targets": [{"url": format!("https://{up}")}],
                         "tls": {"ca_bundle": upstream_ca.pem, "server_name": "upstream.internal"}},
        }),
    )
    .await;
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/", n.gateway_port);
    let mut status = 0;
    for _ in 0..100 {
        status = http
            .get(&url)
            .header("host", "stall.example")
            .send()
            .await
            .map_or(0, |r| r.status().as_u16());
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(status, 200, "the API is routed");

    // a body of 1 MB announced, 10 bytes sent, then silence (the socket stays open)
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", n.gateway_port))
        .await
        .unwrap();
    c.write_all(
        b"POST /upload HTTP/1.1\r\nHost: stall.example\r\nContent-Length: 1000000\r\n\r\n0123456789",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"ok") {
        let n = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf))
            .await
            .expect("the answer comes")
            .unwrap();
        assert!(n > 0, "closed before the answer");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    let after = tokio::time::timeout(Duration::from_secs(15), closed.recv())
        .await
        .expect("the upstream connection is closed within the idle timeout, not held")
        .expect("a POST connection ended");
    assert!(
        after >= Duration::from_millis(1500) && after < Duration::from_secs(8),
        "closed {after:?} after the answer (idle timeout 2 s)"
    );
    drop(c);

    // the answer's body stops after 7 of its 100 bytes: the client's connection is closed
    let mut c = tokio::net::TcpStream::connect(("127.0.0.1", n.gateway_port))
        .await
        .unwrap();
    c.write_all(b"GET /stall HTTP/1.1\r\nHost: stall.example\r\n\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(15), c.read(&mut buf))
            .await
            .expect("the stalled answer is cut, not held")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("partial"),
        "{text}"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(2500),
        "cut after {:?}, not before the response timeout (3 s)",
        started.elapsed()
    );

    // a body that stops coming before any answer: 408 after the idle timeout (2 s), before the
    // response timeout (3 s), and the client's fault, not the upstream's
    let text = raw_head(
        n.gateway_port,
        b"POST /wait HTTP/1.1\r\nHost: stall.example\r\nContent-Length: 1000\r\n\r\n0123456789",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
}

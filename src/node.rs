//! Wiring and lifecycle of a node: start order, bootstrap, background tasks, systemd
//! notifications (READY, WATCHDOG, STOPPING) and graceful shutdown on SIGTERM / SIGINT.

use crate::admin::{self, auth::BearerTokens, auth::Denials, AppState};
use crate::cluster::{Cluster, RaftSettings};
use crate::config::Config;
use crate::model::{format_time, Role, Spec, TokenSpec, UserSpec};
use crate::state::{self, Command, Context, Response};
use crate::store::{LogStore, StateMachine, StateReader};
use crate::{pki, telemetry};
use anyhow::{bail, Context as _};
use sd_notify::NotifyState;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// File names inside the data directory.
pub const TOKEN_FILE: &str = "admin.token";
pub const PKI_DIR: &str = "pki";
pub const CA_FILE: &str = "ca.crt";
pub const AUDIT_KEY_FILE: &str = "audit-signing.key";
pub const AUDIT_PUB_FILE: &str = "audit-signing.pub";
pub const AUDIT_DIR: &str = "audit";

/// Where the node's audit signing key lives.
pub fn audit_key_paths(data_dir: &Path) -> crate::store::AuditKeyPaths {
    let pki = data_dir.join(PKI_DIR);
    crate::store::AuditKeyPaths {
        private: pki.join(AUDIT_KEY_FILE),
        public: pki.join(AUDIT_PUB_FILE),
    }
}

fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        pki::create_private_dir(dir)
            .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    }
    if !dir.is_dir() {
        bail!("the data directory {} is not a directory", dir.display());
    }
    Ok(())
}

/// Options of `apim serve` beyond the configuration file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Break-glass: issue a new platform-admin token into `<data-dir>/admin.token` at start-up
    /// (for when every admin token is lost or expired). Needs local access to the data directory,
    /// and is audited.
    pub issue_admin_token: bool,
}

/// Writes a platform-admin token to `<data-dir>/admin.token`: on first start (bootstrap, which
/// also creates the user `admin`) or when asked (break-glass). The secret is first written to
/// `admin.token.new`, then renamed once the command is committed, so a crash in between never
/// leaves `admin.token` holding a token the state does not know; the next start settles it.
async fn admin_token(
    cluster: &Cluster,
    reader: &StateReader,
    cfg: &Config,
    force: bool,
) -> anyhow::Result<()> {
    let token_path = cfg.data_dir.join(TOKEN_FILE);
    let pending = cfg.data_dir.join(format!("{TOKEN_FILE}.new"));
    if pending.exists() {
        let secret = std::fs::read_to_string(&pending)
            .with_context(|| format!("cannot read {}", pending.display()))?;
        let hash = pki::secret_hash(secret.trim());
        if reader.read(|kv| state::find_token(kv, &hash))?.is_some() {
            pki::rename_durable(&pending, &token_path)?;
            tracing::info!(path = %token_path.display(), "admin token of an interrupted start settled");
        } else {
            std::fs::remove_file(&pending)
                .with_context(|| format!("cannot remove {}", pending.display()))?;
        }
    }
    let users = reader.read(|kv| state::list_objects(kv, crate::model::Kind::User, None))?;
    let bootstrapping = users.is_empty();
    if !bootstrapping && !force {
        return Ok(());
    }
    let owner = if bootstrapping {
        "admin".to_string()
    } else {
        users
            .iter()
            .filter_map(|o| match &o.spec {
                Spec::User(u) if u.role == Role::PlatformAdmin && !u.disabled => {
                    Some(u.name.clone())
                }
                _ => None,
            })
            .min_by_key(|n| n != "admin")
            .ok_or_else(|| anyhow::anyhow!("no enabled platform-admin user to issue a token for"))?
    };
    let secret = pki::random_secret(admin::auth::TOKEN_PREFIX)?;
    let now = time::OffsetDateTime::now_utc();
    let expires = now + time::Duration::days(i64::from(cfg.admin.bootstrap_token_ttl_days));
    let token = Spec::Token(TokenSpec {
        name: pki::random_id("tok-")?,
        user: owner.clone(),
        prefix: admin::auth::secret_prefix(&secret),
        token_hash: pki::secret_hash(&secret),
        expires_at: format_time(expires),
        revoked: false,
        description: Some(
            if bootstrapping {
                "bootstrap token"
            } else {
                "break-glass token issued at start-up"
            }
            .into(),
        ),
    });
    let ctx = Context {
        time: format_time(now),
        credential: None,
        actor: if bootstrapping {
            "bootstrap"
        } else {
            "break-glass"
        }
        .into(),
        role: "system".into(),
        request_id: pki::random_id("req-")?,
        source: "local".into(),
    };
    let cmd = if bootstrapping {
        Command::Bootstrap {
            ctx,
            user: Box::new(Spec::User(UserSpec {
                name: owner.clone(),
                role: Role::PlatformAdmin,
                display_name: Some("Bootstrap administrator".into()),
                disabled: false,
            })),
            token: Box::new(token),
        }
    } else {
        Command::Mutate {
            ctx,
            tenant: None,
            action: "token.issue-local".into(),
            changes: vec![state::Change::Create(token)],
        }
    };
    pki::write_private(&pending, format!("{secret}\n").as_bytes())?;
    match cluster.write(cmd).await {
        Ok(Response::Done { .. }) => {
            pki::rename_durable(&pending, &token_path)?;
            tracing::info!(path = %token_path.display(), user = %owner, "platform-admin token written");
            Ok(())
        }
        other => {
            let _ = std::fs::remove_file(&pending);
            match other {
                Ok(r) => bail!("issuing the admin token was refused: {r:?}"),
                Err(e) => bail!("issuing the admin token failed: {e}"),
            }
        }
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return "none";
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// Runs a node until SIGTERM or SIGINT.
pub async fn run(cfg: Config, opts: RunOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    telemetry::init(&cfg.log);
    pki::install_crypto_provider();
    let data_dir: PathBuf = cfg.data_dir.clone();
    prepare_data_dir(&data_dir)?;
    let admin_addr = cfg
        .admin_addr()
        .map_err(|e| anyhow::anyhow!("admin.listen: {e}"))?;

    // The stores first: they lock their files, so a second process on this data directory
    // stops here, before touching anything.
    let log_store = LogStore::open(&data_dir)?;
    let pki_dir = data_dir.join(PKI_DIR);
    pki::create_private_dir(&pki_dir)?;
    let sm = StateMachine::open(&data_dir, audit_key_paths(&data_dir))?;

    let (identity_path, may_create) = cfg.secrets_identity();
    let sealer = Arc::new(
        crate::secrets::Sealer::load_or_create(&identity_path, may_create)
            .context("secrets.identity_file")?,
    );

    let ca = pki::Ca::load_or_create(&pki_dir)?;
    let (cert, key) = pki::admin_certificate(&ca, &pki_dir, &cfg.admin.tls_names)?;
    let tls = pki::server_config(&cert, &key)?;
    let listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("cannot listen on {admin_addr} (admin.listen)"))?;

    let reader = sm.reader();
    let settings = RaftSettings {
        snapshot_every: cfg.raft.snapshot_every,
        keep_logs: cfg.raft.keep_logs,
    };
    let cluster = Cluster::start(
        cfg.node_id,
        admin_addr.to_string(),
        &settings,
        log_store,
        sm.clone(),
    )
    .await?;
    admin_token(&cluster, &reader, &cfg, opts.issue_admin_token).await?;

    let denials = Arc::new(Denials::new(cfg.audit.security_event_max_groups));
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    let app_state = Arc::new(AppState {
        cluster: cluster.clone(),
        reader: reader.clone(),
        auth: Arc::new(BearerTokens {
            reader: reader.clone(),
        }),
        denials: denials.clone(),
        max_body_bytes: cfg.admin.max_body_bytes,
        request_timeout: Duration::from_secs(cfg.admin.request_timeout_seconds),
        default_ttl_days: cfg.admin.default_credential_ttl_days,
        started,
        openapi: admin::openapi::document(),
        metrics: metrics.clone(),
        sealer: sealer.clone(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let grace = Duration::from_secs(cfg.admin.shutdown_grace_seconds);
    let gateway_task = if cfg.gateway.enabled {
        Some(
            start_gateway(
                &cfg,
                metrics.clone(),
                &sm,
                &cluster,
                sealer.clone(),
                stop_rx.clone(),
                grace,
            )
            .await?,
        )
    } else {
        None
    };
    let limits = admin::ConnLimits {
        max_connections: cfg.admin.max_connections,
        header_timeout: Duration::from_secs(cfg.admin.header_timeout_seconds),
        idle_timeout: Duration::from_secs(60),
    };
    let server = tokio::spawn(admin::serve(
        listener,
        tls,
        admin::router(app_state),
        stop_rx.clone(),
        grace,
        limits,
    ));

    // Durability and checkpoints of the applied state and audit segments.
    let flusher = {
        let sm = sm.clone();
        let mut stop = stop_rx.clone();
        let every = Duration::from_millis(cfg.audit.flush_interval_ms);
        let checkpoint_every = Duration::from_secs(cfg.audit.checkpoint_interval_seconds);
        tokio::spawn(async move {
            let mut last_checkpoint = Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => return,
                }
                let checkpoint = last_checkpoint.elapsed() >= checkpoint_every;
                let sm = sm.clone();
                let res = tokio::task::spawn_blocking(move || {
                    let t = admin::now();
                    sm.flush(checkpoint.then_some(t.as_str()))
                })
                .await;
                match res {
                    Ok(Ok(())) => {
                        if checkpoint {
                            last_checkpoint = Instant::now();
                        }
                    }
                    Ok(Err(e)) => tracing::error!(error = %e, "flush of state and audit failed"),
                    Err(e) => tracing::error!(error = %e, "flush task failed"),
                }
            }
        })
    };

    // Refused requests, aggregated per window, audited as security events.
    let security_events = {
        let cluster = cluster.clone();
        let denials = denials.clone();
        let mut stop = stop_rx.clone();
        let window = Duration::from_secs(cfg.audit.security_event_window_seconds);
        tokio::spawn(async move {
            loop {
                let stopping = tokio::select! {
                    _ = tokio::time::sleep(window) => false,
                    _ = stop.changed() => true,
                };
                flush_denials(&cluster, &denials).await;
                if stopping {
                    return;
                }
            }
        })
    };

    // systemd watchdog
    if let Some(interval) = sd_notify::watchdog_enabled() {
        let mut stop = stop_rx.clone();
        let cluster = cluster.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval / 2) => {}
                    _ = stop.changed() => return,
                }
                if cluster.is_healthy() {
                    let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                }
            }
        });
    }

    let _ = sd_notify::notify(&[NotifyState::Ready]);
    tracing::info!(
        admin = %admin_addr,
        data_dir = %data_dir.display(),
        ready_ms = started.elapsed().as_millis() as u64,
        version = env!("CARGO_PKG_VERSION"),
        "apim node ready"
    );

    let signal = shutdown_signal().await;
    tracing::info!(signal, "shutting down: draining admin requests");
    let _ = sd_notify::notify(&[NotifyState::Stopping]);
    let _ = stop_tx.send(true);
    let _ = server.await;
    if let Some(g) = gateway_task {
        let _ = g.await;
    }
    let _ = security_events.await;
    let _ = flusher.await;
    cluster.shutdown().await;
    let sm2 = sm.clone();
    tokio::task::spawn_blocking(move || sm2.flush(Some(&admin::now())))
        .await
        .map_err(|e| anyhow::anyhow!("final flush task: {e}"))??;
    tracing::info!("apim node stopped");
    Ok(())
}

/// The routing table, then the certificate table for the hosts its APIs claim.
fn build_tables(
    reader: &StateReader,
    sealer: &crate::secrets::Sealer,
    cache: &mut crate::gateway::tls::KeyCache,
) -> Result<
    (
        crate::gateway::routes::RouteTable,
        crate::gateway::tls::CertTable,
    ),
    crate::state::StoreError,
> {
    let table = reader.read(crate::gateway::routes::RouteTable::build)?;
    let claimed = table.claimed_hosts();
    let certs =
        reader.read(|kv| crate::gateway::tls::CertTable::build(kv, sealer, cache, &claimed))?;
    Ok((table, certs))
}

/// Binds the gateway listeners, installs the first routing and certificate tables, keeps them
/// in step with committed changes, and serves until `stop`.
async fn start_gateway(
    cfg: &Config,
    metrics: Arc<crate::telemetry::Metrics>,
    sm: &StateMachine,
    cluster: &Cluster,
    sealer: Arc<crate::secrets::Sealer>,
    stop: watch::Receiver<bool>,
    grace: Duration,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use crate::gateway::{Gateway, UpstreamTimeouts};
    let reader = &sm.reader();
    let addr = cfg
        .gateway_addr()
        .map_err(|e| anyhow::anyhow!("gateway.http_listen: {e}"))?;
    let workers = match cfg.gateway.workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let listeners = crate::gateway::Listeners {
        http: crate::gateway::bind(addr, workers)
            .with_context(|| format!("cannot listen on {addr} (gateway.http_listen)"))?,
        https: match cfg
            .gateway_tls_addr()
            .map_err(|e| anyhow::anyhow!("gateway.https_listen: {e}"))?
        {
            Some(a) => crate::gateway::bind(a, workers)
                .with_context(|| format!("cannot listen on {a} (gateway.https_listen)"))?,
            None => Vec::new(),
        },
    };
    let gateway = Arc::new(Gateway::new(
        UpstreamTimeouts {
            connect: Duration::from_millis(cfg.gateway.upstream_connect_timeout_ms),
            response: Duration::from_secs(cfg.gateway.upstream_response_timeout_seconds),
        },
        metrics,
        crate::gateway::Forwarding {
            trusted_proxies: cfg.gateway.trusted_proxies.clone(),
            rfc7239: cfg.gateway.forwarded_header,
        },
        crate::gateway::access::AccessLog::new(
            &cfg.gateway.access_log_fields,
            cfg.log.format != "text",
        ),
    )?);
    let mut changes = sm.gateway_changes();
    let mut key_cache = crate::gateway::tls::KeyCache::new();
    // identities the gateway cannot map (it reads them from the claim index only), said once
    for (tenant, consumer, identity) in reader.read(crate::state::unclaimed_client_certs)? {
        tracing::error!(tenant = %tenant, consumer = %consumer, identity = %identity, "client certificate identity not in the claim index (consumer written by an earlier build, or the identity is another consumer's): mutual-tls does not map it to this consumer until the consumer is written again with a PUT");
    }
    let (table, certs) = build_tables(reader, &sealer, &mut key_cache)?;
    gateway.swap_certificates(certs);
    gateway.swap(table);
    {
        let gateway = gateway.clone();
        let reader = reader.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let mut key_cache = Some(key_cache);
            loop {
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = stop.changed() => return,
                }
                let reader = reader.clone();
                let sealer = sealer.clone();
                let mut cache = key_cache.take().unwrap_or_default();
                let started = Instant::now();
                let built = tokio::task::spawn_blocking(move || {
                    let tables = build_tables(&reader, &sealer, &mut cache);
                    (tables, cache)
                })
                .await;
                match built {
                    Ok((Ok((table, certs)), cache)) => {
                        key_cache = Some(cache);
                        let routes = table.routes;
                        // certificates first: a new API's host is served with its certificate
                        gateway.swap_certificates(certs);
                        gateway.swap(table);
                        tracing::debug!(
                            routes,
                            build_ms = started.elapsed().as_millis() as u64,
                            "gateway routing and certificate tables swapped"
                        );
                    }
                    Ok((Err(e), cache)) => {
                        key_cache = Some(cache);
                        tracing::error!(error = %e, "gateway table rebuild failed; serving the previous one")
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "gateway table rebuild task failed")
                    }
                }
            }
        });
    }
    let limits = crate::gateway::ListenerLimits {
        header_timeout: Duration::from_secs(cfg.gateway.header_timeout_seconds),
        handshake_timeout: Duration::from_secs(cfg.gateway.tls_handshake_timeout_seconds),
        max_connections: cfg.gateway.max_connections,
        max_header_bytes: cfg.gateway.max_header_bytes,
        max_headers: cfg.gateway.max_headers,
        idle_timeout: Duration::from_secs(cfg.gateway.idle_timeout_seconds),
        grace,
    };
    tracing::info!(
        gateway = %listeners.http[0].local_addr()?,
        https = %listeners.https.first().and_then(|l| l.local_addr().ok()).map(|a| a.to_string()).unwrap_or_default(),
        routes = gateway.routes(),
        workers,
        "gateway listening"
    );
    {
        // the access log's buffered lines reach the log within this interval
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(crate::gateway::access::FLUSH_EVERY);
            loop {
                every.tick().await;
                gateway.access.flush();
            }
        });
    }
    tokio::spawn(gateway.clone().run_health_checks(stop.clone()));
    tokio::spawn(gateway.clone().run_jwks_refresh(stop.clone()));
    // Usage metering: flushed into the replicated state every interval, and once more after
    // the listeners have drained. Batches are numbered after the last one the state applied.
    let node_id = cfg.node_id;
    let own_after = gateway
        .usage
        .start_batches_after(reader.read(|kv| crate::state::last_usage_batch(kv, node_id))?);
    // Quotas count from the replicated usage counters: told of every batch applied from now on,
    // then read, before the first request (gateway::quota).
    gateway.quotas.set_own(node_id, own_after);
    {
        let quotas = Arc::downgrade(&gateway);
        sm.on_usage(Arc::new(move |applied| {
            let Some(gateway) = quotas.upgrade() else {
                return;
            };
            match applied {
                crate::store::UsageApplied::Batch {
                    node,
                    batch,
                    entries,
                } => gateway.quotas.applied(node, batch, entries),
                crate::store::UsageApplied::Replaced(reader) => {
                    if let Err(e) = gateway.quotas.reload(reader) {
                        tracing::error!(error = %e, "cannot read the usage counters after a snapshot; quotas keep the counts they had, plus the batches applied since");
                    }
                }
            }
        }));
    }
    let counters = gateway
        .quotas
        .reload(reader)
        .context("cannot read the usage counters the quotas count from")?;
    tracing::debug!(counters, "quota counters read");
    let drained = crate::gateway::start_workers(gateway.clone(), listeners, stop.clone(), limits)
        .context("cannot start the gateway's worker threads")?;
    {
        let (gateway, cluster, mut stop) = (gateway.clone(), cluster.clone(), stop.clone());
        let every = Duration::from_secs(cfg.gateway.usage_flush_seconds);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.changed() => return,
                }
                flush_usage(&cluster, node_id, &gateway).await;
            }
        });
    }
    let cluster = cluster.clone();
    Ok(tokio::spawn(async move {
        for worker in drained {
            let _ = worker.await;
        }
        gateway.access.flush();
        flush_usage(&cluster, node_id, &gateway).await;
    }))
}

/// Writes the usage counted since the last flush (a batch that failed first, unchanged); a
/// batch that cannot be written is kept for the next flush.
async fn flush_usage(cluster: &Cluster, node: u64, gateway: &crate::gateway::Gateway) {
    let meter = &gateway.usage;
    for _ in 0..2 {
        let Some((batch, entries)) = meter.next_batch() else {
            return;
        };
        // the quotas take its requests out of their local count once the state holds it
        gateway.quotas.writing(batch, &entries);
        let n = entries.len();
        let cmd = Command::RecordUsage {
            node,
            batch,
            entries: entries.clone(),
        };
        match cluster.write(cmd).await {
            Ok(_) => tracing::debug!(counters = n, batch, "usage recorded"),
            Err(e) => {
                tracing::warn!(error = %e, counters = n, batch, "could not record usage; kept for the next flush");
                meter.keep_unsent(batch, entries);
                return;
            }
        }
    }
}

async fn flush_denials(cluster: &Cluster, denials: &Denials) {
    let events = denials.take();
    if events.is_empty() {
        return;
    }
    let n = events.len();
    let cmd = Command::SecurityEvents {
        ctx: Context {
            time: admin::now(),
            actor: "system".into(),
            credential: None,
            role: "system".into(),
            request_id: pki::random_id("sec-").unwrap_or_default(),
            source: "local".into(),
        },
        events,
    };
    if let Err(e) = cluster.write(cmd).await {
        tracing::warn!(error = %e, groups = n, "could not audit security events");
    }
}

//! Authentication (pluggable: bearer tokens today, OIDC next), the RBAC decision, and the
//! aggregation of refused requests into security events.

use super::problem::Problem;
use crate::model::{Kind, Role, Spec};
use crate::state::{self, SecurityEvent};
use crate::store::StateReader;
use axum::http::HeaderMap;
use std::collections::HashMap;
use std::sync::Mutex;

/// Who is calling.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    pub user: String,
    /// The user's tenant; `None` for platform users.
    pub tenant: Option<String>,
    pub role: Role,
    /// Id of the credential used (a token id), for the audit trail.
    pub credential: String,
}

/// Why a request could not be authenticated. The reason is logged and audited, but the client
/// only learns that authentication failed.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthFailure {
    pub reason: &'static str,
    /// A non-secret hint of who tried (token prefix, user name), for the audit trail.
    pub claimed: String,
}

/// A way to turn request headers into a principal.
pub trait Authenticator: Send + Sync {
    fn authenticate(&self, headers: &HeaderMap, now: &str) -> Result<Principal, AuthFailure>;
}

/// API tokens: `Authorization: Bearer apim_…`, looked up by SHA-256 in the replicated state.
pub struct BearerTokens {
    pub reader: StateReader,
}

pub const TOKEN_PREFIX: &str = "apim_";

/// The first characters of a secret, safe to show and to audit.
pub fn secret_prefix(secret: &str) -> String {
    secret.chars().take(TOKEN_PREFIX.len() + 6).collect()
}

impl Authenticator for BearerTokens {
    fn authenticate(&self, headers: &HeaderMap, now: &str) -> Result<Principal, AuthFailure> {
        let fail = |reason, claimed: &str| AuthFailure {
            reason,
            claimed: claimed.to_string(),
        };
        let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
            return Err(fail("no Authorization header", "anonymous"));
        };
        let Ok(value) = value.to_str() else {
            return Err(fail("Authorization header is not ASCII", "anonymous"));
        };
        let token = match value.split_once(' ') {
            Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
            _ => return Err(fail("Authorization is not a Bearer token", "anonymous")),
        };
        if !token.starts_with(TOKEN_PREFIX) || token.len() > 256 {
            return Err(fail("malformed token", "anonymous"));
        }
        let prefix = secret_prefix(token);
        let hash = crate::pki::secret_hash(token);
        let found = self
            .reader
            .read(|kv| state::find_token(kv, &hash))
            .map_err(|_| fail("token store unavailable", &prefix))?;
        let Some((tok, user)) = found else {
            return Err(fail("unknown token", &prefix));
        };
        let (Spec::Token(t), Spec::User(u)) = (&tok.spec, &user.spec) else {
            return Err(fail("unknown token", &prefix));
        };
        if t.revoked {
            return Err(fail("revoked token", &u.name));
        }
        if t.expires_at.as_str() <= now {
            return Err(fail("expired token", &u.name));
        }
        if u.disabled {
            return Err(fail("disabled user", &u.name));
        }
        Ok(Principal {
            user: u.name.clone(),
            tenant: user.meta.tenant.clone(),
            role: u.role,
            credential: t.name.clone(),
        })
    }
}

/// What a request does to a kind of object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

/// The RBAC decision for a principal acting on `kind` objects in `tenant` (`None`: platform
/// scope). `own_token` is true when the objects are the principal's own API tokens, which every
/// user may manage. A foreign tenant answers 404 (its existence is not revealed); a refused
/// action in the principal's own tenant answers 403.
pub fn authorize(
    p: &Principal,
    tenant: Option<&str>,
    kind: Kind,
    op: Op,
    own_token: bool,
) -> Result<(), Problem> {
    if p.role == Role::PlatformAdmin {
        return Ok(());
    }
    let forbidden = || {
        Problem::forbidden(format!(
            "role {} may not {} {} objects",
            p.role,
            if op == Op::Read { "read" } else { "change" },
            kind
        ))
    };
    let Some(t) = tenant else {
        if own_token {
            return Ok(());
        }
        return Err(forbidden());
    };
    if p.tenant.as_deref() != Some(t) {
        return Err(Problem::not_found(format!("tenant {t:?} not found")));
    }
    if own_token {
        return Ok(());
    }
    let allowed = match (p.role, kind, op) {
        (Role::TenantAdmin, Kind::Tenant, Op::Write) => false,
        (Role::TenantAdmin, _, _) => true,
        (Role::ApiPublisher, Kind::Api | Kind::Consumer | Kind::Key | Kind::Subscription, _) => {
            true
        }
        (Role::ApiPublisher, Kind::Plan | Kind::Tenant | Kind::Certificate, Op::Read) => true,
        (Role::Viewer, Kind::User | Kind::Token, _) => false,
        (Role::Viewer, _, Op::Read) => true,
        _ => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(forbidden())
    }
}

// ---------------------------------------------------------------------------------------------
// Security events

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DenialKey {
    source: String,
    principal: String,
    status: u16,
    tenant: Option<String>,
}

#[derive(Debug, Clone)]
struct DenialAgg {
    reason: String,
    count: u64,
    first_seen: String,
    last_seen: String,
    sample_path: String,
}

/// Refused requests of the current window, grouped by (source, principal, status, tenant), so a
/// flood of refusals becomes a handful of audit records rather than a flood of Raft entries.
pub struct Denials {
    groups: Mutex<HashMap<DenialKey, DenialAgg>>,
    max_groups: usize,
}

impl Denials {
    pub fn new(max_groups: usize) -> Self {
        Denials {
            groups: Mutex::new(HashMap::new()),
            max_groups,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        source: &str,
        principal: &str,
        status: u16,
        reason: &str,
        tenant: Option<&str>,
        path: &str,
        now: &str,
    ) {
        let mut g = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = DenialKey {
            source: source.to_string(),
            principal: principal.to_string(),
            status,
            tenant: tenant.map(str::to_string),
        };
        if !g.contains_key(&key) && g.len() >= self.max_groups {
            key = DenialKey {
                source: "*".into(),
                principal: "*".into(),
                status,
                tenant: None,
            };
        }
        let path: String = path.chars().take(200).collect();
        g.entry(key)
            .and_modify(|a| {
                a.count += 1;
                a.last_seen = now.to_string();
            })
            .or_insert_with(|| DenialAgg {
                reason: reason.to_string(),
                count: 1,
                first_seen: now.to_string(),
                last_seen: now.to_string(),
                sample_path: path,
            });
    }

    /// Takes the groups of the closing window, as security events sorted for determinism.
    pub fn take(&self) -> Vec<SecurityEvent> {
        let groups = std::mem::take(&mut *self.groups.lock().unwrap_or_else(|p| p.into_inner()));
        let mut events: Vec<SecurityEvent> = groups
            .into_iter()
            .map(|(k, a)| SecurityEvent {
                source: k.source,
                principal: k.principal,
                status: k.status,
                reason: a.reason,
                tenant: k.tenant,
                count: a.count,
                first_seen: a.first_seen,
                last_seen: a.last_seen,
                sample_path: a.sample_path,
            })
            .collect();
        events.sort_by(|a, b| {
            (&a.first_seen, &a.source, &a.principal).cmp(&(&b.first_seen, &b.source, &b.principal))
        });
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(role: Role, tenant: Option<&str>) -> Principal {
        Principal {
            user: "u".into(),
            tenant: tenant.map(str::to_string),
            role,
            credential: "tok".into(),
        }
    }

    #[test]
    fn foreign_tenant_is_not_found_own_tenant_is_forbidden() {
        let pubr = p(Role::ApiPublisher, Some("a"));
        assert_eq!(
            authorize(&pubr, Some("b"), Kind::Api, Op::Read, false)
                .unwrap_err()
                .status,
            404
        );
        assert!(authorize(&pubr, Some("a"), Kind::Api, Op::Write, false).is_ok());
        assert_eq!(
            authorize(&pubr, Some("a"), Kind::User, Op::Read, false)
                .unwrap_err()
                .status,
            403
        );
        assert_eq!(
            authorize(&pubr, Some("a"), Kind::Plan, Op::Write, false)
                .unwrap_err()
                .status,
            403
        );
        let viewer = p(Role::Viewer, Some("a"));
        assert!(authorize(&viewer, Some("a"), Kind::Subscription, Op::Read, false).is_ok());
        assert_eq!(
            authorize(&viewer, Some("a"), Kind::Api, Op::Write, false)
                .unwrap_err()
                .status,
            403
        );
        assert!(authorize(&viewer, Some("a"), Kind::Token, Op::Write, true).is_ok());
        let admin = p(Role::TenantAdmin, Some("a"));
        assert!(authorize(&admin, Some("a"), Kind::User, Op::Write, false).is_ok());
        assert_eq!(
            authorize(&admin, None, Kind::Tenant, Op::Write, false)
                .unwrap_err()
                .status,
            403
        );
    }

    #[test]
    fn denials_aggregate_and_overflow() {
        let d = Denials::new(2);
        for i in 0..100 {
            d.record(
                "10.0.0.1",
                "anonymous",
                401,
                "no header",
                None,
                "/x",
                &format!("t{i:03}"),
            );
        }
        d.record(
            "10.0.0.2",
            "anonymous",
            401,
            "no header",
            None,
            "/x",
            "t100",
        );
        d.record(
            "10.0.0.3",
            "anonymous",
            401,
            "no header",
            None,
            "/x",
            "t101",
        );
        let ev = d.take();
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0].count, 100);
        assert!(ev.iter().any(|e| e.source == "*"));
        assert!(d.take().is_empty());
    }
}

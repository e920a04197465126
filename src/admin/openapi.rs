//! The OpenAPI 3 document of the admin API, built from the route table below and the schemas
//! derived from the model types (`utoipa::ToSchema`), so the document follows the code.

use crate::model::{
    ApiSpec, CertificateSpec, ConsumerSpec, KeySpec, PlanSpec, SubscriptionSpec, TenantSpec,
    TokenSpec, UserSpec,
};
use std::borrow::Cow;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, OpenApiBuilder, Paths, Ref, RefOr, Required,
    ResponseBuilder, Schema,
};
use utoipa::{PartialSchema, ToSchema};

struct Op {
    method: HttpMethod,
    path: Cow<'static, str>,
    id: Cow<'static, str>,
    summary: &'static str,
    tag: &'static str,
    body: Option<&'static str>,
    ok: (&'static str, Option<&'static str>),
    auth: bool,
}

fn op(
    method: HttpMethod,
    path: impl Into<Cow<'static, str>>,
    id: impl Into<Cow<'static, str>>,
    summary: &'static str,
    tag: &'static str,
    body: Option<&'static str>,
    ok: (&'static str, Option<&'static str>),
) -> Op {
    Op {
        method,
        path: path.into(),
        id: id.into(),
        summary,
        tag,
        body,
        ok,
        auth: true,
    }
}

fn operations() -> Vec<Op> {
    use HttpMethod::*;
    let mut ops = vec![
        Op {
            auth: false,
            ..op(
                Get,
                "/admin/v1/health",
                "health",
                "Liveness and leadership of this node",
                "node",
                None,
                ("200", None),
            )
        },
        Op {
            auth: false,
            ..op(
                Get,
                "/admin/v1/openapi.json",
                "openapi",
                "This document",
                "node",
                None,
                ("200", None),
            )
        },
        op(
            Get,
            "/admin/v1/status",
            "status",
            "Node, Raft and audit status",
            "node",
            None,
            ("200", None),
        ),
        op(
            Get,
            "/admin/v1/audit",
            "audit_list",
            "Audit records, newest first, filtered by tenant, actor, action, resource and time",
            "audit",
            None,
            ("200", None),
        ),
        op(
            Get,
            "/admin/v1/tenants",
            "tenant_list",
            "List tenants",
            "tenants",
            None,
            ("200", None),
        ),
        op(
            Post,
            "/admin/v1/tenants",
            "tenant_create",
            "Create a tenant (platform-admin)",
            "tenants",
            Some("TenantSpec"),
            ("201", Some("TenantSpec")),
        ),
        op(
            Get,
            "/admin/v1/tenants/{tenant}",
            "tenant_get",
            "Get a tenant",
            "tenants",
            None,
            ("200", Some("TenantSpec")),
        ),
        op(
            Put,
            "/admin/v1/tenants/{tenant}",
            "tenant_update",
            "Replace a tenant (If-Match required)",
            "tenants",
            Some("TenantSpec"),
            ("200", Some("TenantSpec")),
        ),
        op(
            Delete,
            "/admin/v1/tenants/{tenant}",
            "tenant_delete",
            "Delete an empty tenant",
            "tenants",
            None,
            ("204", None),
        ),
        op(
            Get,
            "/admin/v1/tenants/{tenant}/export",
            "tenant_export",
            "The tenant's configuration as one document (format=yaml|json)",
            "gitops",
            None,
            ("200", None),
        ),
        op(
            Post,
            "/admin/v1/tenants/{tenant}/diff",
            "tenant_diff",
            "What applying a document would create, change and delete",
            "gitops",
            None,
            ("200", None),
        ),
        op(
            Post,
            "/admin/v1/tenants/{tenant}/apply",
            "tenant_apply",
            "Converge the tenant to a document, atomically",
            "gitops",
            None,
            ("200", None),
        ),
        op(
            Get,
            "/admin/v1/tenants/{tenant}/audit",
            "tenant_audit",
            "Audit records of one tenant",
            "audit",
            None,
            ("200", None),
        ),
        op(
            Get,
            "/admin/v1/tenants/{tenant}/usage",
            "tenant_usage",
            "Usage per consumer, API and UTC hour (consumer, from, to), with totals",
            "usage",
            None,
            ("200", None),
        ),
        op(
            Get,
            "/admin/v1/users",
            "platform_user_list",
            "List platform users",
            "users",
            None,
            ("200", None),
        ),
        op(
            Post,
            "/admin/v1/users",
            "platform_user_create",
            "Create a platform-admin user",
            "users",
            Some("UserSpec"),
            ("201", Some("UserSpec")),
        ),
        op(
            Get,
            "/admin/v1/users/{user}",
            "platform_user_get",
            "Get a platform user",
            "users",
            None,
            ("200", Some("UserSpec")),
        ),
        op(
            Put,
            "/admin/v1/users/{user}",
            "platform_user_update",
            "Replace a platform user",
            "users",
            Some("UserSpec"),
            ("200", Some("UserSpec")),
        ),
        op(
            Delete,
            "/admin/v1/users/{user}",
            "platform_user_delete",
            "Delete a platform user and its tokens",
            "users",
            None,
            ("204", None),
        ),
        op(
            Get,
            "/admin/v1/users/{user}/tokens",
            "platform_token_list",
            "List a platform user's tokens",
            "users",
            None,
            ("200", None),
        ),
        op(
            Post,
            "/admin/v1/users/{user}/tokens",
            "platform_token_create",
            "Create a token (the secret is returned once)",
            "users",
            Some("NewCredential"),
            ("201", Some("TokenSpec")),
        ),
        op(
            Get,
            "/admin/v1/users/{user}/tokens/{id}",
            "platform_token_get",
            "Get a token's metadata",
            "users",
            None,
            ("200", Some("TokenSpec")),
        ),
        op(
            Put,
            "/admin/v1/users/{user}/tokens/{id}",
            "platform_token_update",
            "Revoke or change a token's expiry",
            "users",
            Some("CredentialUpdate"),
            ("200", Some("TokenSpec")),
        ),
        op(
            Delete,
            "/admin/v1/users/{user}/tokens/{id}",
            "platform_token_delete",
            "Delete a token",
            "users",
            None,
            ("204", None),
        ),
        op(
            Get,
            "/admin/v1/tenants/{tenant}/consumers/{consumer}/keys",
            "key_list",
            "List a consumer's API keys",
            "consumers",
            None,
            ("200", None),
        ),
        op(
            Post,
            "/admin/v1/tenants/{tenant}/consumers/{consumer}/keys",
            "key_create",
            "Create an API key (the key is returned once)",
            "consumers",
            Some("NewCredential"),
            ("201", Some("KeySpec")),
        ),
        op(
            Get,
            "/admin/v1/tenants/{tenant}/consumers/{consumer}/keys/{id}",
            "key_get",
            "Get a key's metadata",
            "consumers",
            None,
            ("200", Some("KeySpec")),
        ),
        op(
            Put,
            "/admin/v1/tenants/{tenant}/consumers/{consumer}/keys/{id}",
            "key_update",
            "Revoke a key or change its expiry",
            "consumers",
            Some("CredentialUpdate"),
            ("200", Some("KeySpec")),
        ),
        op(
            Delete,
            "/admin/v1/tenants/{tenant}/consumers/{consumer}/keys/{id}",
            "key_delete",
            "Delete a key",
            "consumers",
            None,
            ("204", None),
        ),
        op(
            Get,
            "/admin/v1/tenants/{tenant}/users/{user}/tokens",
            "token_list",
            "List a user's tokens",
            "users",
            None,
            ("200", None),
        ),
        op(
            Post,
            "/admin/v1/tenants/{tenant}/users/{user}/tokens",
            "token_create",
            "Create a token (the secret is returned once)",
            "users",
            Some("NewCredential"),
            ("201", Some("TokenSpec")),
        ),
        op(
            Get,
            "/admin/v1/tenants/{tenant}/users/{user}/tokens/{id}",
            "token_get",
            "Get a token's metadata",
            "users",
            None,
            ("200", Some("TokenSpec")),
        ),
        op(
            Put,
            "/admin/v1/tenants/{tenant}/users/{user}/tokens/{id}",
            "token_update",
            "Revoke or change a token's expiry",
            "users",
            Some("CredentialUpdate"),
            ("200", Some("TokenSpec")),
        ),
        op(
            Delete,
            "/admin/v1/tenants/{tenant}/users/{user}/tokens/{id}",
            "token_delete",
            "Delete a token",
            "users",
            None,
            ("204", None),
        ),
    ];
    // The tenant collections share one shape.
    const COLLECTIONS: [(&str, &str, &str); 6] = [
        ("apis", "ApiSpec", "api"),
        ("consumers", "ConsumerSpec", "consumer"),
        ("plans", "PlanSpec", "plan"),
        ("subscriptions", "SubscriptionSpec", "subscription"),
        ("users", "UserSpec", "user"),
        ("certificates", "CertificateSpec", "certificate"),
    ];
    for (seg, schema, tag) in COLLECTIONS {
        let list = format!("/admin/v1/tenants/{{tenant}}/{seg}");
        let item = format!("/admin/v1/tenants/{{tenant}}/{seg}/{{name}}");
        let id = |verb: &str| format!("{tag}_{verb}");
        ops.push(op(
            Get,
            list.clone(),
            id("list"),
            "List (limit, offset, sort, name_prefix, filters)",
            tag,
            None,
            ("200", None),
        ));
        ops.push(op(
            Post,
            list.clone(),
            id("create"),
            "Create",
            tag,
            Some(schema),
            ("201", Some(schema)),
        ));
        ops.push(op(
            Get,
            item.clone(),
            id("get"),
            "Get (returns an ETag)",
            tag,
            None,
            ("200", Some(schema)),
        ));
        ops.push(op(
            Put,
            item.clone(),
            id("update"),
            "Replace (If-Match required)",
            tag,
            Some(schema),
            ("200", Some(schema)),
        ));
        ops.push(op(
            Delete,
            item.clone(),
            id("delete"),
            "Delete (If-Match honoured)",
            tag,
            None,
            ("204", None),
        ));
    }
    ops
}

fn schema_ref(name: &str) -> RefOr<Schema> {
    RefOr::Ref(Ref::from_schema_name(name))
}

/// Builds the OpenAPI document as JSON text.
pub fn document() -> String {
    let mut schemas: Vec<(String, RefOr<Schema>)> = Vec::new();
    fn add<T: ToSchema>(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((T::name().into_owned(), <T as PartialSchema>::schema()));
        T::schemas(schemas);
    }
    add::<TenantSpec>(&mut schemas);
    add::<ApiSpec>(&mut schemas);
    add::<ConsumerSpec>(&mut schemas);
    add::<PlanSpec>(&mut schemas);
    add::<SubscriptionSpec>(&mut schemas);
    add::<UserSpec>(&mut schemas);
    add::<KeySpec>(&mut schemas);
    add::<TokenSpec>(&mut schemas);
    add::<CertificateSpec>(&mut schemas);
    add::<super::handlers::NewCredential>(&mut schemas);
    add::<super::handlers::CredentialUpdate>(&mut schemas);

    let mut paths = Paths::new();
    for o in operations() {
        let mut b = OperationBuilder::new()
            .operation_id(Some(o.id))
            .summary(Some(o.summary))
            .tag(o.tag);
        for seg in o.path.split('/') {
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                b = b.parameter(
                    ParameterBuilder::new()
                        .name(name)
                        .parameter_in(ParameterIn::Path)
                        .required(Required::True)
                        .schema(Some(String::schema())),
                );
            }
        }
        if matches!(o.method, HttpMethod::Put | HttpMethod::Delete) {
            b = b.parameter(
                ParameterBuilder::new()
                    .name("If-Match")
                    .parameter_in(ParameterIn::Header)
                    .required(if o.method == HttpMethod::Put {
                        Required::True
                    } else {
                        Required::False
                    })
                    .schema(Some(String::schema())),
            );
        }
        if let Some(body) = o.body {
            b = b.request_body(Some(
                RequestBodyBuilder::new()
                    .content(
                        "application/json",
                        ContentBuilder::new().schema(Some(schema_ref(body))).build(),
                    )
                    .required(Some(Required::True))
                    .build(),
            ));
        }
        let mut ok = ResponseBuilder::new().description("success");
        if let Some(s) = o.ok.1 {
            ok = ok.content(
                "application/json",
                ContentBuilder::new().schema(Some(schema_ref(s))).build(),
            );
        }
        b = b.response(o.ok.0, ok.build());
        let problem = || {
            ResponseBuilder::new()
                .description("RFC 9457 problem")
                .content("application/problem+json", ContentBuilder::new().build())
                .build()
        };
        for code in [
            "400", "401", "403", "404", "409", "412", "413", "422", "428",
        ] {
            b = b.response(code, problem());
        }
        if o.auth {
            b = b.security(SecurityRequirement::new("bearer", Vec::<String>::new()));
        }
        paths.add_path_operation(o.path, vec![o.method], b.build());
    }
    let mut components = ComponentsBuilder::new().security_scheme(
        "bearer",
        SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
    );
    for (name, schema) in schemas {
        components = components.schema(name, schema);
    }
    let doc = OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("apim admin API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some("Control plane of the apim appliance. Errors are RFC 9457 problem+json; writes use ETag / If-Match."))
                .build(),
        )
        .paths(paths)
        .components(Some(components.build()))
        .build();
    doc.to_json().unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn document_has_every_route_and_schema() {
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        assert!(doc["paths"]["/admin/v1/tenants/{tenant}/apis/{name}"]["put"].is_object());
        assert!(doc["components"]["schemas"]["ApiSpec"].is_object());
        assert!(doc["components"]["schemas"]["Policy"].is_object());
    }

    #[test]
    fn every_schema_reference_resolves() {
        fn refs<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(serde_json::Value::String(r)) = m.get("$ref") {
                        out.push(r);
                    }
                    m.values().for_each(|v| refs(v, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let doc: serde_json::Value = serde_json::from_str(&super::document()).unwrap();
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(!found.is_empty());
        for r in found {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected reference {r}"));
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "{r} has no schema"
            );
        }
        // the upstream's newer settings are documented
        for name in ["ApiTimeouts", "UpstreamProtocol", "HeaderRename"] {
            assert!(doc["components"]["schemas"][name].is_object(), "{name}");
        }
    }
}

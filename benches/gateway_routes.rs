//! Benchmark of the gateway's routing table: the time to rebuild it from the applied state for
//! 10,000 published APIs (the gateway issue's target is ≤ 50 ms) and the cost of one lookup.
//!
//! Run: `cargo bench --bench gateway_routes`. Pure in-process work: the state is built with
//! `state::apply` in memory, no node is started.

use apim::gateway::routes::RouteTable;
use apim::model::{
    ApiSpec, ConsumerSpec, KeySpec, Lifecycle, Policy, Spec, TenantSpec, Upstream, UpstreamTarget,
};
use apim::state::{self, Change, Command, Context};
use std::time::{Duration, Instant};

type Mem = apim::state::MemKv;

fn run(kv: &mut Mem, index: u64, tenant: Option<&str>, changes: Vec<Change>) {
    let cmd = Command::Mutate {
        ctx: Context {
            time: "2026-11-28T00:00:00.000Z".into(),
            actor: "bench".into(),
            credential: None,
            role: "platform-admin".into(),
            request_id: "bench".into(),
            source: "local".into(),
        },
        tenant: tenant.map(str::to_string),
        action: "bench".into(),
        changes,
    };
    let applied = state::apply(kv, index, &cmd).expect("apply");
    for (k, v) in applied.writes {
        match v {
            Some(v) => kv.0.insert(k, v),
            None => kv.0.remove(&k),
        };
    }
}

/// The median of seven runs of `run`, each returning the time it measured.
fn median_of_7(mut run: impl FnMut() -> Duration) -> Duration {
    let mut times: Vec<Duration> = (0..7).map(|_| run()).collect();
    times.sort();
    times[3]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    const TENANTS: usize = 10;
    const APIS: usize = 10_000;
    let mut kv = Mem::default();
    let mut index = 1;
    for t in 0..TENANTS {
        let name = format!("tenant-{t}");
        run(
            &mut kv,
            index,
            None,
            vec![Change::Create(Spec::Tenant(TenantSpec {
                name: name.clone(),
                display_name: None,
                description: None,
            }))],
        );
        index += 1;
        let changes = (0..APIS / TENANTS)
            .map(|i| {
                Change::Create(Spec::Api(ApiSpec {
                    name: format!("api-{i}"),
                    version: "v1".into(),
                    display_name: None,
                    hosts: vec![
                        format!("api{}.{name}.example", i % 50),
                        format!("*.{name}.example"),
                    ],
                    base_path: format!("/svc-{i}"),
                    upstream: Upstream {
                        targets: vec![UpstreamTarget {
                            url: "http://127.0.0.1:9000".into(),
                            weight: 1,
                        }],
                        ..Default::default()
                    },
                    policies: vec![Policy::RateLimit {
                        requests: 100,
                        per_seconds: 1,
                        per: Default::default(),
                    }],
                    routes: vec![],
                    lifecycle: Lifecycle::Published,
                }))
            })
            .collect();
        run(&mut kv, index, Some(&name), changes);
        index += 1;
    }
    let build = median_of_7(|| {
        let t = Instant::now();
        let table = RouteTable::build(&kv).expect("build");
        assert_eq!(table.routes, APIS);
        t.elapsed()
    });
    let table = RouteTable::build(&kv).expect("build");
    let lookups = 1_000_000;
    let t = Instant::now();
    let mut found = 0;
    for i in 0..lookups {
        let host = format!("api{}.tenant-{}.example", i % 50, i % TENANTS);
        if table
            .lookup(&host, &format!("/svc-{}/x", (i * 7) % (APIS / TENANTS)))
            .is_some()
        {
            found += 1;
        }
    }
    let per_lookup = t.elapsed().as_nanos() as f64 / lookups as f64;
    assert!(found > 0);
    // What installing a table adds (Gateway::swap): every API's metric series, then the
    // removal of the series the previous table had and this one has not (none here).
    let metrics = apim::telemetry::Metrics::new();
    let mut previous = RouteTable::build(&kv).expect("build");
    for r in previous.all() {
        r.series
            .get_or_init(|| apim::telemetry::ApiSeries::new(&metrics, &r.tenant, &r.api));
    }
    let swap = median_of_7(|| {
        let next = RouteTable::build(&kv).expect("build");
        let t = Instant::now();
        metrics.carry_series(&previous, &next);
        metrics.forget_gone(&previous, &next);
        let took = t.elapsed();
        previous = next;
        took
    });
    // the same APIs plus 1,000 consumers per tenant with two API keys each: every key is in
    // the table, so a rebuild also costs the keys
    for t in 0..TENANTS {
        let name = format!("tenant-{t}");
        let mut changes = Vec::new();
        for c in 0..1_000 {
            changes.push(Change::Create(Spec::Consumer(ConsumerSpec {
                name: format!("app-{c}"),
                display_name: None,
                contact_email: None,
                description: None,
                client_certificates: Vec::new(),
            })));
            for k in 0..2 {
                changes.push(Change::Create(Spec::Key(KeySpec {
                    name: format!("key-{t}-{c}-{k}"),
                    consumer: format!("app-{c}"),
                    prefix: "bench".into(),
                    key_hash: format!("{:064x}", (t * 1_000 + c) * 2 + k),
                    expires_at: "2036-01-01T00:00:00.000Z".into(),
                    revoked: false,
                    description: None,
                })));
            }
        }
        run(&mut kv, index, Some(&name), changes);
        index += 1;
    }
    let keyed = median_of_7(|| {
        let t = Instant::now();
        let table = RouteTable::build(&kv).expect("build");
        assert_eq!(table.keys.len(), TENANTS * 2_000, "every key in the table");
        t.elapsed()
    });
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| rebuild the routing table, {APIS} APIs in {TENANTS} tenants (median of 7) | {:.1} ms |",
        build.as_secs_f64() * 1e3
    );
    println!(
        "| metric bookkeeping of installing that table over one with the same APIs (series carried over, none gone; median of 7) | {:.1} ms |",
        swap.as_secs_f64() * 1e3
    );
    println!(
        "| the same rebuild with 10,000 consumers and 20,000 API keys besides (median of 7) | {:.1} ms |",
        keyed.as_secs_f64() * 1e3
    );
    println!("| one lookup, most falling through to a wildcard host holding 1,000 APIs (a host's routes indexed by base path) | {per_lookup:.0} ns |");
}

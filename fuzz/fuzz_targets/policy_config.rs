//! API specifications and tenant documents (JSON and YAML) on arbitrary input: parsing and
//! validation refuse bad input with an error and never panic; what validation accepts
//! compiles into a routing table.
#![no_main]

use apim::gateway::routes::RouteTable;
use apim::model::{ApiSpec, TenantDocument};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(api) = serde_json::from_slice::<ApiSpec>(data) {
        if api.check().is_ok() {
            let _ = RouteTable::from_apis("t", std::slice::from_ref(&api));
        }
    }
    if let Ok(doc) = serde_norway::from_slice::<TenantDocument>(data) {
        let _ = doc.check();
    }
});

//! The HTTP/1.1 client's reading of an upstream's response head (`gateway::h1`) on arbitrary
//! bytes: never a panic, and wherever the quick reader reads a head (the usual plain form,
//! without httparse), httparse reads the same one: the same length, status code, version and
//! fields, names and values as they came.
#![no_main]

use apim::gateway::h1::response_readings;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (quick, full) = response_readings(data);
    if let Some(quick) = quick {
        assert_eq!(Some(quick), full, "the quick reading differs from httparse's");
    }
});

//! The gateway's own HTTP/1.1 server (`gateway::front`) on arbitrary bytes at the start of a
//! connection, its requests read one after another as pipelined: never a panic; a request it
//! takes is one it may take (HTTP/1.1, origin-form, none of the headers that are hyper's to
//! handle, at most one all-digit `Content-Length` whose body came whole), and the bytes add up
//! (head and body taken, the rest left in the buffer, nothing lost or repeated); it waits for
//! more only on a head that is incomplete and within the size limit; bytes it does not take
//! are left untouched, for hyper's server.
#![no_main]

use apim::gateway::front::{take_head, Taken};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // the size limit varies with the input (the first byte), so heads reach it
    let Some((&first, data)) = data.split_first() else {
        return;
    };
    let max_bytes = 64 + usize::from(first) * 16;
    // the default field limit, and one below the server's first try of 24
    for max_fields in [100, 16] {
        let mut rest = data;
        for _ in 0..8 {
            let (taken, left) = take_head(rest, max_fields, max_bytes);
            let mut fields = vec![httparse::EMPTY_HEADER; max_fields];
            let mut parsed = httparse::Request::new(&mut fields);
            let status = parsed.parse(rest);
            assert_eq!(&left[..], rest_after(&taken, rest), "the bytes add up");
            let (req, n) = match taken {
                Taken::Wait => {
                    assert!(
                        matches!(status, Ok(httparse::Status::Partial)) && rest.len() <= max_bytes,
                        "waits only on an incomplete head within the limit: {status:?}"
                    );
                    break;
                }
                Taken::HandOver => {
                    assert!(
                        !(matches!(status, Ok(httparse::Status::Partial))
                            && rest.len() <= max_bytes),
                        "an incomplete head within the limit is waited for, not handed over"
                    );
                    break;
                }
                Taken::Request(req, n) => (*req, n),
            };
            let head = match status {
                Ok(httparse::Status::Complete(h)) => h,
                other => panic!("a request taken from a head httparse gives {other:?}"),
            };
            assert!(head <= max_bytes, "a head over the limit taken");
            assert_eq!(parsed.version, Some(1), "HTTP/1.1 only");
            assert_eq!(parsed.method, Some(req.method.as_str()));
            // every field, once, as it came
            let taken: Vec<(&[u8], &[u8])> = req.fields.iter().collect();
            let sent: Vec<(&[u8], &[u8])> = parsed
                .headers
                .iter()
                .map(|h| (h.name.as_bytes(), h.value))
                .collect();
            assert_eq!(taken, sent, "every field, once, as it came");
            assert!(req.uri.path().starts_with('/'), "{:?}", req.uri);
            // (the target as received, a fragment aside: the URI drops it)
            let target = parsed.path.map(|p| p.split('#').next().unwrap_or(p));
            assert_eq!(Some(req.uri.to_string().as_str()), target);
            assert!(req.method != http::Method::CONNECT);
            for name in ["transfer-encoding", "expect", "upgrade", "te"] {
                assert!(!req.fields.contains(name), "{name} taken");
            }
            assert!(
                !req.fields.lists("connection", "upgrade"),
                "an upgrade taken"
            );
            let lengths: Vec<_> = req.fields.get_all("content-length").collect();
            assert!(lengths.len() <= 1, "several lengths taken");
            let length: usize = match lengths.first() {
                Some(v) => {
                    assert!(v.iter().all(u8::is_ascii_digit), "{v:?}");
                    std::str::from_utf8(v).unwrap().parse().unwrap()
                }
                None => 0,
            };
            // the body is the announced length after the head
            assert_eq!(n, head + length, "head and body taken, nothing else");
            let body = http_body_util::BodyExt::collect(req.body);
            let body = ready(body).expect("an in-memory body").to_bytes();
            assert_eq!(&body[..], &rest[head..n]);
            rest = &rest[n..];
        }
    }
});

/// The bytes the server should leave: after the request it took, or all of them.
fn rest_after<'a>(taken: &Taken, bytes: &'a [u8]) -> &'a [u8] {
    match taken {
        Taken::Request(_, n) => &bytes[*n..],
        _ => bytes,
    }
}

/// The output of a future that is ready at once (the body of a taken request is in memory).
fn ready<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => out,
        std::task::Poll::Pending => panic!("a taken body must be in memory"),
    }
}
